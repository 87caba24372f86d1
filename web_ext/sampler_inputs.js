// Cross-Frame Sampler: frame_count, width and height only matter when it generates from noise. Once a
// clip (images, latent, inversion) or a ControlNet (whose hints fix count and size) is connected they are
// ignored, so the canvas greys them out instead of showing values that do nothing.
import { app } from "../../scripts/app.js";

const SIZE_WIDGETS = ["frame_count", "width", "height"];
const SIZE_SOURCES = ["images", "latent", "inversion", "injection", "control"];

function updateSizeWidgets(node) {
  const fixed = (node.inputs ?? []).some((input) => SIZE_SOURCES.includes(input.name) && input.link != null);
  for (const widget of node.widgets ?? []) {
    if (SIZE_WIDGETS.includes(widget.name)) widget.disabled = fixed;
  }
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "video_edit.SamplerInputs",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "VE_CrossFrameSampler") return;
    const onConnectionsChange = nodeType.prototype.onConnectionsChange;
    nodeType.prototype.onConnectionsChange = function () {
      const result = onConnectionsChange?.apply(this, arguments);
      updateSizeWidgets(this);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      updateSizeWidgets(this);
      return result;
    };
  },
});
