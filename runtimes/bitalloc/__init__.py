"""bitalloc's own runtime: its packed Triton kernels (`bitalloc.kernels`) run a packed checkpoint (`bitalloc pack`,
`bitalloc.load_packed`): grouped 2-8 bit codes, asymmetric, groups of 64 or 128 (the kernels take any group size, a
compile-time constant; 128 beside 64 gives the search cheaper steps: on the off-grid model the mixed point at uniform
3-bit's bytes measured 0.68 KL against 0.76 with group 64 alone, uniform 1.27, the embedding unsearched),
from the `clip` or `rtn` quantizers; the token embedding is packed row by row (`QuantEmbedding`), a mixture-of-experts
block's projections expert after expert (`QuantExperts`)."""

from __future__ import annotations

from ..base import Runtime, register


@register("bitalloc")
class Packed(Runtime):
    summary = ("bitalloc's packed kernels: 2-8 bits, groups 64/128, asymmetric (the token embedding and MoE experts "
               "packed too)")
    methods = ("clip", "rtn")
    bits = (2, 3, 4, 5, 6, 8)
    symmetric = False
    embeddings = True  # a `QuantEmbedding`: the token embedding packed row by row, a tied head sharing it
    experts = True  # a `QuantExperts`: each projection of an experts module packed, its experts' rows stacked
    export_file = None  # its artifact is the packed checkpoint (`bitalloc build`, or `pack`)
    artifact = "folder"
    file_sized = True  # the front's bytes are the packed folder's (`folder.folder_bytes`)

    def file_bytes(self, ws):
        from .folder import folder_bytes

        return folder_bytes(ws)

    def check_buildable(self, doc) -> None:
        from .checkpoint import check_packable

        check_packable(doc)

    def build(self, picked, card, out, stages):
        from .checkpoint import pack

        with stages.stage("pack the checkpoint"):
            packed = pack(picked.config, out, picked.front.data.hash)
        (out / "README.md").write_text(card.markdown(self.name))
        return {"packed_layer_bytes": packed}

    def verify(self, ws, picked, text, work, presets, stages, recipe=False):
        from .measure import verify

        return verify(ws, picked, work, stages)
