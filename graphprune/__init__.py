"""graphprune: a compiler for structured pruning of PyTorch models.

>>> import graphprune
>>> small = graphprune.compile(model, (x,), ratio=0.5, ignore=["fc"])
"""
from .allocate import Report
from .api import analyze, compile
from .checkpoint import load, save
from .distill import distill, distill_loss
from .export import check_onnx, export, to_onnx
from .loop import GroupLasso, bn_l1, prune_iteratively, recalibrate_bn
from .search import SearchResult, Sensitivity, search, sensitivity
from .errors import GraphpruneError, GraphpruneWarning
from .flops import count_flops, count_params
from .importance import register_importance
from .pass_manager import PassResult, register_pass, run_pipeline
from .rotate import MixedNorm, rotate_residual

__all__ = ["analyze", "compile", "save", "load", "search", "sensitivity", "prune_iteratively", "recalibrate_bn", "bn_l1", "GroupLasso",
           "GraphpruneError", "GraphpruneWarning", "register_pass", "register_importance", "run_pipeline", "PassResult", "count_flops",
           "count_params", "Report", "SearchResult", "Sensitivity", "distill", "distill_loss", "export", "to_onnx",
           "check_onnx", "rotate_residual", "MixedNorm"]
