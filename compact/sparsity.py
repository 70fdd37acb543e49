"""N:M semi-structured sparsity: masks, pattern checks, one-shot pruning, SLoRB, 2:4 kernels.

Targets are the linear layers inside the transformer blocks (named by compact.arch adapters; for
a family without one, every nn.Linear under the blocks, compact.arch_generic); the embeddings
and the LM head stay dense. Every mask is taken along the input dimension of an
(out, in) view of the weight: in each row, every group of M consecutive input columns keeps N
entries. GPT-2's Conv1D stores (in, out) weights; `compact.arch.weight_oi` hides that, and its
fused q/k/v matrix is treated as one weight.

One-shot methods (all prune in place, one signature):
- magnitude: keep the largest |W|.
- wanda: keep the largest |W_ij| * ||X_j||_2 (input-channel norms from calibration).
- sparsegpt: second-order pruning with the layer Hessian H = X^T X, block by block, each
  pruned column's error pushed into the later columns through the Cholesky factor of H^-1.
Calibrated methods run block by block: the inputs of block i come from blocks < i already
pruned, so only one block's statistics are held at a time.

SLoRB (the AST paper's extra parameters): for block size k, y = x W~^T + (x X^T) S^T where X
sums each group of k consecutive input channels and S (out x in/k) starts at the mean of each
group's pruned weights. A checkpoint keeps S in a side file (slorb.safetensors) so that its
base weights stay an ordinary transformers checkpoint.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from compact import arch_generic, hardware
from compact.arch import weight_oi
from compact.errors import Cancelled, UserError

SPARSEGPT_BLOCK = 128
SPARSEGPT_DAMP = 0.01
SLORB_FILE = "slorb.safetensors"

Progress = Callable[[float, str], None]


# ---------------------------------------------------------------------------------- patterns

def parse_pattern(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4), checked."""
    try:
        n, m = (int(x) for x in str(text).strip().split(":"))
    except ValueError:
        raise UserError(f"pattern '{text}' is not N:M (for example 2:4)") from None
    check_nm(n, m)
    return n, m


def check_nm(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or m < 2 or not 0 < n < m:
        raise UserError(f"pattern {n}:{m} is not valid: need 0 < N < M and M >= 2 (for example 2:4)")


def nm_mask(weight_oi: Tensor, n: int = 2, m: int = 4, score: Tensor | None = None) -> Tensor:
    """Boolean keep-mask of weight_oi's shape: the n largest |score| in every m input columns."""
    check_nm(n, m)
    out_f, in_f = weight_oi.shape
    if in_f % m:
        raise UserError(f"input width {in_f} is not divisible by M={m}")
    s = (weight_oi if score is None else score).detach().abs().float().reshape(out_f, in_f // m, m)
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep.scatter_(-1, s.topk(n, dim=-1, sorted=False).indices, True)
    return keep.reshape(out_f, in_f)


def target_linears(model) -> dict[str, nn.Module]:
    """Every linear inside the transformer blocks, by full module name."""
    arch = arch_generic.adapter(model.config)
    prefix = {id(mod): name for name, mod in model.named_modules()}
    out = {}
    for block in arch.blocks(model):
        for _, mod in arch.linears(block).items():
            out[prefix[id(mod)]] = mod
    return out


def check_widths(model, m: int) -> None:
    bad = [f"{name} ({weight_oi(mod).shape[1]})" for name, mod in target_linears(model).items()
           if weight_oi(mod).shape[1] % m]
    if bad:
        raise UserError(f"input width not divisible by M={m}: {bad[0]}"
                        + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))


@torch.no_grad()
def check_pattern(model, n: int = 2, m: int = 4) -> dict:
    """Whether every targeted weight has at most n non-zeros in every group of m input columns."""
    check_nm(n, m)
    layers, zeros, total = {}, 0, 0
    for name, mod in target_linears(model).items():
        w = weight_oi(mod)
        out_f, in_f = w.shape
        nz = w != 0
        ok = in_f % m == 0 and bool((nz.reshape(out_f, in_f // m, m).sum(-1) <= n).all())
        z = int((~nz).sum())
        layers[name] = {"sparsity": z / w.numel(), "ok": ok}
        zeros, total = zeros + z, total + w.numel()
    return {"ok": all(v["ok"] for v in layers.values()) and bool(layers), "pattern": f"{n}:{m}",
            "layers": layers, "sparsity": zeros / max(total, 1)}


# ---------------------------------------------------------------------------------- one-shot

@torch.no_grad()
def prune_magnitude(w: Tensor, n: int, m: int) -> Tensor:
    return w * nm_mask(w, n, m)


@torch.no_grad()
def prune_wanda(w: Tensor, sq_norm: Tensor, n: int, m: int) -> Tensor:
    """sq_norm: per input channel, the mean of squared activations (any positive scale)."""
    score = w.abs().float() * sq_norm.float().sqrt().unsqueeze(0)
    return w * nm_mask(w, n, m, score)


@torch.no_grad()
def prune_sparsegpt(w: Tensor, hessian: Tensor, n: int, m: int, block: int = SPARSEGPT_BLOCK,
                    damp: float = SPARSEGPT_DAMP) -> Tensor:
    """SparseGPT for N:M on an (out, in) weight with H = X^T X over calibration inputs."""
    W = w.detach().float().clone()
    cols = W.shape[1]
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0  # channels never active: any value works, zero them
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = _inverse_cholesky(H, damp)
    block = max(m, block // m * m)  # an M-group must not straddle two column blocks
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        diag = torch.diag(Hinv1)
        prune = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % m == 0:  # choose this group's pruned entries with the weights updated so far
                score = W1[:, i:i + m] ** 2 / diag[i:i + m].unsqueeze(0) ** 2
                prune[:, i:i + m].scatter_(1, score.topk(m - n, dim=1, largest=False).indices, True)
            col = W1[:, i]
            q = torch.where(prune[:, i], torch.zeros_like(col), col)
            Q1[:, i] = q
            err = (col - q) / diag[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(w.dtype)


def _inverse_cholesky(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + damp*mean(diag) I)^-1, damping more if H is singular."""
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    for factor in (1, 10, 100, 1000):
        try:
            L = torch.linalg.cholesky(H + damp * factor * mean_diag * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise UserError("SparseGPT: the calibration Hessian is singular even with damping; "
                    "use more calibration samples")


class _Stats:
    """Running input statistics of one linear, named by a method's `statistic`:
    "sq_norm" per-channel mean of squares (Wanda), "gram" X^T X / tokens (SparseGPT)."""

    def __init__(self, in_f: int, statistic: str, device):
        self.statistic, self.count = statistic, 0
        shape = (in_f, in_f) if statistic == "gram" else (in_f,)
        self.acc = torch.zeros(shape, device=device, dtype=torch.float32)

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.statistic == "gram":
            self.acc.addmm_(x.T, x)
        else:
            self.acc += (x * x).sum(0)
        self.count += x.shape[0]

    def value(self) -> Tensor:
        return self.acc / max(self.count, 1)


@dataclass(frozen=True)
class OneShotMethod:
    """A one-shot N:M method: prune(w_oi, statistic_or_None, n, m) -> pruned w_oi, and the input
    statistic it needs from calibration (None: the weights alone, no calibration data)."""

    prune: Callable[[Tensor, Tensor | None, int, int], Tensor]
    statistic: str | None
    help: str


# Every one-shot method; the CLI choices, the app's methods and the experiments read this table.
ONE_SHOT = {
    "magnitude": OneShotMethod(lambda w, _stat, n, m: prune_magnitude(w, n, m), None,
                               "keep the largest |W| (no calibration)"),
    "wanda": OneShotMethod(prune_wanda, "sq_norm", "keep the largest |W|·‖X‖ (input norms from calibration)"),
    "sparsegpt": OneShotMethod(prune_sparsegpt, "gram",
                               "second-order: prune with the layer Hessian XᵀX, update the kept weights"),
}
METHODS = tuple(ONE_SHOT)


class _Stop(Exception):
    pass


def _block_inputs(model, arch, batches: list[Tensor]):
    """Hidden states entering block 0 and every block's other call arguments, per batch."""
    blocks = arch.blocks(model)
    first: list[Tensor] = []
    calls: list[list[tuple]] = [[] for _ in blocks]

    def recorder(i):
        def hook(mod, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            calls[i].append((tuple(args[1:]), kwargs))
            if i == 0:
                first.append(hidden)
            if i == len(blocks) - 1:
                raise _Stop  # everything recorded; skip the rest of the model
        return hook

    handles = [b.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return first, calls


def _run_block(block, hidden: Tensor, call: tuple) -> Tensor:
    args, kwargs = call
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def one_shot(model, method: str, n: int = 2, m: int = 4, blocks: Tensor | None = None,
             progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
             batch_size: int = 8) -> dict:
    """Prune every targeted linear to N:M in place with a method of ONE_SHOT; per-layer stats.

    Calibrated methods need token blocks. If should_stop() turns true, Cancelled is raised and
    the model is left with the blocks processed so far pruned.
    """
    if method not in ONE_SHOT:
        raise UserError(f"unknown one-shot method '{method}': use {', '.join(ONE_SHOT)}")
    spec = ONE_SHOT[method]
    check_nm(n, m)
    check_widths(model, m)
    if spec.statistic is not None and (blocks is None or len(blocks) == 0):
        raise UserError(f"{method} needs calibration data")
    arch = arch_generic.adapter(model.config)
    names = {id(mod): name for name, mod in model.named_modules()}
    tblocks = arch.blocks(model)
    report = {"method": method, "pattern": f"{n}:{m}", "layers": {}}
    was_training = model.training
    model.eval()
    try:
        if spec.statistic is not None:
            device = next(model.parameters()).device
            batches = [blocks[i:i + batch_size].to(device) for i in range(0, len(blocks), batch_size)]
            hidden, calls = _block_inputs(model, arch, batches)
        for i, block in enumerate(tblocks):
            if should_stop and should_stop():
                raise Cancelled(f"{method} stopped after {i} of {len(tblocks)} blocks", report)
            linears = arch.linears(block)
            stats = dict.fromkeys(linears)
            if spec.statistic is not None:
                stats = _block_statistics(block, linears, hidden, calls[i], spec.statistic)
            for name, mod in linears.items():
                value = stats[name].value() if stats[name] is not None else None
                _replace(mod, spec.prune(weight_oi(mod), value, n, m), report, names[id(mod)])
            del stats
            if spec.statistic is not None:  # inputs of the next block come from this block pruned
                hidden = [_run_block(block, h, call) for h, call in zip(hidden, calls[i], strict=True)]
            if progress is not None:
                progress((i + 1) / len(tblocks), f"{method} {n}:{m}: block {i + 1}/{len(tblocks)}")
        return report
    finally:
        model.train(was_training)


def _block_statistics(block, linears: dict, hidden: list[Tensor], calls: list, statistic: str) -> dict:
    """Each linear's input statistic over one block's calibration inputs."""
    device = hidden[0].device
    stats = {name: _Stats(weight_oi(mod).shape[1], statistic, device) for name, mod in linears.items()}
    handles = [mod.register_forward_hook(lambda _m, inp, _o, s=stats[name]: s.add(inp[0]))
               for name, mod in linears.items()]
    try:
        for h, call in zip(hidden, calls, strict=True):
            _run_block(block, h, call)
    finally:
        for h in handles:
            h.remove()
    return stats


def _replace(mod: nn.Module, new_oi: Tensor, report: dict, name: str) -> None:
    w = weight_oi(mod)
    w.copy_(new_oi.to(w.dtype))
    report["layers"][name] = {"sparsity": float((w == 0).float().mean()), "shape": list(w.shape)}


@torch.no_grad()
def apply_masks(model, masks: dict[str, Tensor]) -> None:
    """Zero every targeted weight outside its (out, in) keep-mask."""
    for name, mod in target_linears(model).items():
        if name in masks:
            w = weight_oi(mod)
            w.mul_(masks[name].to(w.device, w.dtype))


# ---------------------------------------------------------------------------------- SLoRB

def group_sum(x: Tensor, k: int) -> Tensor:
    """x X^T for SLoRB's fixed 0/1 matrix X: the sum of each group of k input channels."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // k, k).sum(-1)


def slorb_init(weight_oi: Tensor, keep: Tensor, k: int) -> Tensor:
    """S (out x in/k): per row and group of k inputs, the mean of the weights the mask prunes."""
    out_f, in_f = weight_oi.shape
    pruned = (weight_oi.detach().float() * (~keep)).reshape(out_f, in_f // k, k)
    return pruned.mean(-1)


def _slorb_forward(self, x: Tensor) -> Tensor:
    # the module's own forward, plus the SLoRB term on the same input
    return type(self).forward(self, x) + F.linear(group_sum(x, self.slorb_k), self.slorb_s.to(x.dtype))


def attach_slorb(module: nn.Module, s: Tensor, k: int) -> None:
    """Give a linear (or Conv1D) its SLoRB term, trainable S as the parameter `slorb_s`."""
    in_f = weight_oi(module).shape[1]
    if in_f % k:
        raise UserError(f"input width {in_f} is not divisible by the SLoRB block size {k}")
    w = module.weight
    module.slorb_s = nn.Parameter(s.to(device=w.device, dtype=w.dtype))
    module.slorb_k = k
    module.forward = types.MethodType(_slorb_forward, module)


def detach_slorb(module: nn.Module) -> Tensor:
    """Remove a SLoRB term; returns its S."""
    s = module.slorb_s.detach()
    del module.slorb_s
    del module.slorb_k
    if "forward" in module.__dict__:
        del module.forward
    return s


def attach_slorb_all(model, tensors: dict[str, Tensor], k: int) -> None:
    """Attach S per targeted linear name; S stays out of model.safetensors (see save_slorb)."""
    linears = target_linears(model)
    unknown = set(tensors) - set(linears)
    if unknown:
        raise UserError(f"SLoRB weights name layers the model does not have: {sorted(unknown)[0]}")
    for name, s in tensors.items():
        attach_slorb(linears[name], s, k)
    # save_pretrained then writes an ordinary checkpoint; S lives in slorb.safetensors
    ignore = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    model._keys_to_ignore_on_save = ignore | {f"{name}.slorb_s" for name in tensors}


def slorb_params(model, k: int, n: int = 2, m: int = 4) -> dict:
    """Parameter cost of SLoRB with block size k: against the targeted weights, and against
    the N:M weights that stay non-zero (the paper's figure: k = 16 adds 12.5% at 2:4)."""
    extra = sum(weight_oi(mod).shape[0] * weight_oi(mod).shape[1] // k
                for mod in target_linears(model).values())
    base = sum(weight_oi(mod).numel() for mod in target_linears(model).values())
    return {"k": k, "extra_params": extra, "of_targeted": extra / max(base, 1),
            "of_kept": extra / max(base * n / m, 1)}


def save_slorb(model, out: str | Path, k: int) -> dict:
    """Write every attached S to out/slorb.safetensors; returns the compact.json entry."""
    from safetensors.torch import save_file

    tensors = {name: mod.slorb_s.detach().float().cpu().contiguous()
               for name, mod in target_linears(model).items() if hasattr(mod, "slorb_s")}
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(Path(out) / SLORB_FILE))
    return {"k": k, "file": SLORB_FILE, "layers": len(tensors),
            "extra_params": sum(t.numel() for t in tensors.values())}


def load_slorb(model, folder: str | Path, entry: dict) -> None:
    """Attach the SLoRB terms named in compact.json's "slorb" entry, from the side file."""
    from safetensors.torch import load_file

    path = Path(folder) / entry.get("file", SLORB_FILE)
    if not path.exists():
        raise UserError(f"{folder} says it has SLoRB weights but {path.name} is missing")
    attach_slorb_all(model, load_file(str(path)), int(entry["k"]))


# ---------------------------------------------------------------------------------- kernels

def to_semi_structured(model, n: int = 2, m: int = 4, search_tokens: int = 0) -> dict:
    """Swap eligible targeted weights for torch's 2:4 semi-structured tensors (CUDA only).

    Eligible: a 2:4-sparse nn.Linear weight on CUDA in fp16/bf16 whose shape the kernels accept
    (both dimensions multiples of 64 here, a safe bound for cuSPARSELt and CUTLASS). With
    search_tokens > 0 and the cuSPARSELt backend, each layer's algorithm is picked by
    torch._cslt_sparse_mm_search on an input of that many tokens. Returns which layers were
    converted (with their algorithm ids) and which were skipped, with why. Whether this is faster
    than dense depends on shapes and GPU: measure (bench/bench_sparse.py) before calling it faster.
    """
    if (n, m) != (2, 4):
        raise UserError("the sparse kernels support only the 2:4 pattern")
    ok, why = hardware.sparse_kernels(hardware.props(next(model.parameters()).device))
    if not ok:
        raise UserError(why)
    from torch.sparse import to_sparse_semi_structured

    converted, skipped, algs = [], {}, {}
    for name, mod in target_linears(model).items():
        w = mod.weight
        if isinstance(mod, Conv1D):
            skipped[name] = "Conv1D (stores in x out; only nn.Linear uses the sparse mm path)"
        elif w.dtype not in (torch.float16, torch.bfloat16):
            skipped[name] = f"dtype {w.dtype} (needs float16 or bfloat16)"
        elif w.shape[0] % 64 or w.shape[1] % 64:
            skipped[name] = f"shape {tuple(w.shape)} (needs multiples of 64)"
        elif hasattr(mod, "slorb_s"):
            skipped[name] = "has a SLoRB term"
        else:
            nz = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
            if bool((nz > 2).any()):
                skipped[name] = "not 2:4 sparse"
                continue
            alg = cslt_search(w.detach(), search_tokens) if search_tokens else 0
            mod.weight = nn.Parameter(to_sparse_semi_structured(w.detach(), alg_id=alg), requires_grad=False)
            converted.append(name)
            algs[name] = alg
    return {"converted": converted, "skipped": skipped, "alg_ids": algs}


def cslt_search(weight: Tensor, tokens: int) -> int:
    """cuSPARSELt's best algorithm id for weight @ x^T with x of `tokens` rows (0 if unavailable)."""
    from torch.sparse import SparseSemiStructuredTensor

    if SparseSemiStructuredTensor._FORCE_CUTLASS or not hasattr(torch, "_cslt_sparse_mm_search"):
        return 0
    try:
        compressed = torch._cslt_compress(weight)
        x = torch.randn(weight.shape[1], max(tokens, 16), device=weight.device, dtype=weight.dtype)
        return int(torch._cslt_sparse_mm_search(compressed, x))
    except RuntimeError:  # no cuSPARSELt in this build
        return 0


@torch.no_grad()
def param_counts(model) -> dict:
    """{"params": parameters, "nonzero_params": those not exactly zero} of the whole model (a
    tied embedding counted once, SLoRB terms included)."""
    params = list(model.parameters())
    return {"params": sum(p.numel() for p in params),
            "nonzero_params": sum(int(torch.count_nonzero(p)) for p in params)}


def sparsity_summary(model, n: int, m: int) -> dict:
    res = check_pattern(model, n, m)
    return {"pattern": res["pattern"], "pattern_ok": res["ok"], "sparsity": res["sparsity"],
            "layers_checked": len(res["layers"]),
            "layers_not_ok": [k for k, v in res["layers"].items() if not v["ok"]]}
