// Shows the text a Video Edit node reports (e.g. DDIM Invert's reconstruction PSNR) on the node itself.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "video_edit.ShowText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name?.startsWith("VE_")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text?.join("\n");
      if (!text) return;
      let widget = this.widgets?.find((w) => w.name === "ve_report");
      if (!widget) {
        widget = this.addWidget("text", "ve_report", "", () => {}, { serialize: false });
        widget.serialize = false; // display only: never stored in widgets_values
        widget.disabled = true;
      }
      widget.value = text;
      this.setDirtyCanvas(true, true);
    };
  },
});
