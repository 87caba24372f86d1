"""Attention Injector (Edit-A-Video): FateZero's injector with sparse-causal blending always on."""

from __future__ import annotations

from ..pipelines_core.methods.edit_a_video import edit_a_video
from ..pipelines_core.methods.fatezero import comma_words
from .method_fatezero import VE_InjectFateZero
from .methods import MethodNode, Paper

NO_BLEND_WORDS = ("Attention Injector (Edit-A-Video): blend_words is empty: give the source-prompt word(s) of the "
                  "object to edit, e.g. 'car' (sparse-causal blending makes their blend mask consistent across frames)")


class VE_InjectEditAVideo(VE_InjectFateZero):
    DESCRIPTION = (
        "What the Cross-Frame Sampler injects from DDIM Invert of a clip-tuned model (Tune on Clip), the Edit-A-Video "
        "way: FateZero's attention fusion and prompt-to-prompt, with sparse-causal blending: each frame's latent "
        "blend mask is joined with the first and the previous frame's, so the edited region holds from frame to "
        "frame. Needs blend words (Shin et al., ACML 2023)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        types = super().INPUT_TYPES()  # FateZero's widgets, in its order; only the blend words' meaning differs
        kind, options = types["required"]["blend_words"]
        types["required"]["blend_words"] = (kind, {**options, "tooltip": "Source-prompt words of the object to edit "
                                                                         "(comma separated; required): their mask, "
                                                                         "joined across frames, is what is edited."})
        return types

    @classmethod
    def VALIDATE_INPUTS(cls, blend_words=None):
        """Refuse before anything runs (Tune on Clip's minutes included): without blend words there is no blend."""
        if blend_words is not None and not comma_words(blend_words):  # None: linked, known only when it runs
            return NO_BLEND_WORDS
        return True

    def build(self, inversion, blend_words, **widgets):
        if not comma_words(blend_words):
            raise ValueError(NO_BLEND_WORDS)
        injection, = super().build(inversion, blend_words=blend_words, **widgets)
        return (edit_a_video(injection),)


METHOD = MethodNode(
    name="Edit-A-Video", display_name="Attention Injector (Edit-A-Video)", node=VE_InjectEditAVideo,
    paper=Paper("Edit-A-Video: Single Video Editing with Object-Aware Consistency", "Shin et al.", "ACML 2023",
                "https://arxiv.org/abs/2303.07945"),
    mechanism="FateZero's attention fusion and prompt-to-prompt on a clip-tuned model, with sparse-causal blending: "
              "each frame's latent blend mask joined with the first and the previous frame's",
    workflows=("edit_a_video_edit.json",),
)
