"""SPP as a registered tuning method: its options, the dense-input check, adapters and the merge.

Dense input models: SPP on a dense model is well defined (a multiplicative, rank-structured update) but has
nothing to preserve. ``weight_sparsity(model)`` measures the share of zeros in the targeted linears; below
``DENSE_SPARSITY`` the method warns (``on_dense="warn"``, default), refuses (``"error"``) or stays silent
(``"ignore"``). Warning rather than refusing because a dense SPP run is a legitimate baseline and refusing
would only force users to fake a pruning step.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from ....errors import PrunetuneError
from ...base import TuningMethod, register, write_plain
from .config import SPPConfig  # noqa: F401  (the method's Config)
from .layer import block_sizes
from .model import apply_spp, load_spp_state_dict, merge_spp, spp_state_dict, weight_sparsity


def merged_in_chunks(W, w_alpha, w_beta, scaling: float, chunk_elems: int = 1 << 24):
    """``W ⊙ (1 + s · A ⊙ w_beta)`` with ``A`` the block rows of ``w_alpha``, a chunk of rows at a time."""
    import torch

    sizes = block_sizes(W.shape[0], w_alpha.shape[0])
    block = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    out = torch.empty_like(W)
    step = max(1, chunk_elems // max(1, W.shape[1]))
    for r0 in range(0, W.shape[0], step):
        sl = slice(r0, r0 + step)
        factor = 1.0 + scaling * (w_alpha[block[sl]].double() * w_beta[sl].double())
        if not torch.isfinite(factor).all():
            raise PrunetuneError("SPP merge: adapter weights are not finite (training diverged)")
        out[sl] = (W[sl].double() * factor).to(W.dtype)
    return out

log = logging.getLogger("prunetune")

#: below this share of zero weights in the targeted linears a model counts as dense
DENSE_SPARSITY = 0.01
ADAPTER_FILE = "spp_adapters.safetensors"
ADAPTER_CONFIG = "spp_config.json"


@register
class SPPMethod(TuningMethod):
    """SPP: trainable row/column factors multiply the frozen sparse weights; the merge keeps every zero."""

    name = "spp"
    Config = SPPConfig
    default_lr = 4e-3
    zero_pattern = "identical"
    keeps_zeros = True
    cli_options = (
        ("--spp-groups", "groups", {"type": int, "help": "row blocks sharing one factor row (default 16)"}),
        ("--spp-r", "r", {"type": int, "help": "r; scaling = alpha / r (default 16)"}),
        ("--spp-alpha", "alpha", {"type": float, "help": "alpha (default 32)"}),
        ("--spp-dropout", "dropout", {"type": float, "help": "dropout on the adapter input (default 0.05); 0 fuses "
                                                          "adapter and weight into one matmul (faster steps)"}),
        ("--on-dense", "on_dense", {"help": "a dense input model: warn (default) | error | ignore"}),
    )

    def fingerprint(self) -> dict:
        return {"method": self.name, **{k: v for k, v in self.options().items() if k != "on_dense"}}

    def check(self, model):
        sp = weight_sparsity(model, self.config.targets)
        if self.config.on_dense == "ignore" or sp >= DENSE_SPARSITY:
            return []
        msg = (f"SPP on a dense model (only {sp:.2%} of the targeted weights are zero): there is no sparsity "
               "pattern to preserve; prune it first for a sparse result")
        if self.config.on_dense == "error":
            raise PrunetuneError(msg)
        log.warning(msg)
        return [msg]

    def prepare(self, model):
        return apply_spp(model, self.config)

    def save_adapters(self, model, directory):
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file(spp_state_dict(model), str(d / ADAPTER_FILE))
        (d / ADAPTER_CONFIG).write_text(json.dumps(asdict(self.config), indent=1))

    def load_adapters(self, model, directory):
        from safetensors.torch import load_file

        f = Path(directory) / ADAPTER_FILE
        if not f.is_file():
            raise PrunetuneError(f"no SPP adapters in {directory} (missing {ADAPTER_FILE})")
        load_spp_state_dict(model, load_file(str(f)))

    def export(self, model, out_dir, tokenizer=None):
        return write_plain(merge_spp(model), out_dir, tokenizer)

    def stream_tensors(self, directory, base):
        """The merged checkpoint tensor by tensor (``tuning/streamed.py``): ``W ⊙ (1 + s · A ⊙ w_beta)`` for every
        adapted linear, in row chunks, the same float64 arithmetic as ``SPPLinear.merged_weight``."""
        from ...streamed import AdapterTensors

        f = Path(directory) / ADAPTER_FILE
        if not f.is_file():
            raise PrunetuneError(f"no SPP adapters in {directory} (missing {ADAPTER_FILE})")
        scaling = self.config.scaling

        def tensors():
            ad = AdapterTensors(f)
            names = set(ad.keys())
            for key in base.keys():
                t = base(key)
                mod = key[: -len(".weight")] if key.endswith(".weight") else None
                if mod is not None and f"{mod}.w_alpha" in names:
                    t = merged_in_chunks(t, ad.get_tensor(f"{mod}.w_alpha"), ad.get_tensor(f"{mod}.w_beta"),
                                         scaling)
                yield key, t

        return base.config, tensors(), {}
