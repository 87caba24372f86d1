// Shows the text a Video Edit node reports (e.g. DDIM Invert's reconstruction PSNR) on the node itself,
// in a read-only multiline text box: the canvas draws a disabled plain text widget as its label only.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const REPORT = "ve_report";

function showReport(node, text) {
  let widget = node.widgets?.find((w) => w.name === REPORT);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, REPORT, ["STRING", { multiline: true }], app).widget;
    widget.options.serialize = false; // display only: never stored in widgets_values or sent in a prompt
    widget.serialize = false;
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.7;
    }
  }
  widget.value = text;
  node.setSize(node.computeSize(node.size));
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "video_edit.ShowText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name?.startsWith("VE_")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text?.join("\n");
      if (text) showReport(this, text);
    };
  },
});
