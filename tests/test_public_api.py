"""Every public name of the previous release still imports from its path, or the README names its new home.

``PUBLIC_NAMES`` lists, per module, the public names the release before the layout change exported.
``MOVED`` maps the modules that moved to their new paths; the README's changelog must say each move.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

PUBLIC_NAMES = {
    "evaluation.datasets.face": (
        "decode_images load_bin read_bin_pairs read_detector_scores "
        "read_template_media_list read_template_pairs"
    ),
    "evaluation.datasets.reid": ("JUNK_PID ReIDSplit read_market1501 read_msmt17 read_msmt17_list"),
    "evaluation.identification": (
        "IdentificationResult identification_from_top_k open_set_identification"
    ),
    "evaluation.knn": ("GPU_MAX_K METRICS gpu_available l2_normalize top_k"),
    "evaluation.pml.reid_accuracy_calculator": ("ReIDAccuracyCalculator"),
    "evaluation.pml.reid_tester": ("ReIDTester"),
    "evaluation.pml.verification_accuracy_calculator": (
        "PAIR_MODES VerificationAccuracyCalculator tar_metric_name"
    ),
    "evaluation.reid": (
        "DEFAULT_BLOCK_BYTES DistanceBlocks METRICS PROTOCOLS ReIDResult evaluate_reid "
        "evaluate_reid_from_distances pairwise_distances result_from_positive_ranks"
    ),
    "evaluation.reid_top_k": ("cmc_from_top_k reranking_candidates"),
    "evaluation.sharded": ("sharded_reid_from_distances sharded_top_k"),
    "evaluation.verification": (
        "DEFAULT_FAR_TARGETS IdentificationResult TAR_AT_FAR_RULES TenFoldResult "
        "VerificationReport auc eer fuse_flip identification_from_top_k image_features "
        "load_bin open_set_identification pair_distances read_detector_scores "
        "read_template_media_list read_template_pairs roc tar_at_far template_features "
        "template_pair_scores verification_accuracy_10fold verification_report"
    ),
    "evaluation.verification_kfold": (
        "ACCURACY_THRESHOLDS TenFoldResult VAL_FAR_TARGET VAL_THRESHOLDS fold_bounds "
        "fuse_flip normalize_rows pair_distances verification_accuracy_10fold"
    ),
    "evaluation.verification_roc": (
        "DEFAULT_FAR_TARGETS TAR_AT_FAR_RULES VerificationReport auc check_far_targets "
        "check_pair_scores eer roc tar_at_far verification_report"
    ),
    "evaluation.verification_templates": (
        "MAX_MATRIX_ENTRIES image_features template_features template_pair_scores template_rows"
    ),
    "pml_largest_margin.distributed": (
        "ClassParallelGeneralizedMarginSoftmaxLoss ClassParallelLargestMarginSoftmaxLoss "
        "ClassParallelZeroCentroidRegularizer shard_bounds"
    ),
    "pml_largest_margin.distributed.class_parallel_generalized_margin_softmax_loss": (
        "ClassParallelGeneralizedMarginSoftmaxLoss"
    ),
    "pml_largest_margin.distributed.class_parallel_largest_margin_softmax_loss": (
        "ClassParallelLargestMarginSoftmaxLoss"
    ),
    "pml_largest_margin.distributed.class_parallel_zero_centroid_regularizer": (
        "ClassParallelZeroCentroidRegularizer"
    ),
    "pml_largest_margin.distributed.sharding": ("shard_bounds"),
    "pml_largest_margin.losses": ("GeneralizedMarginSoftmaxLoss LargestMarginSoftmaxLoss"),
    "pml_largest_margin.losses.base_margin_softmax_loss": ("BaseMarginSoftmaxLoss"),
    "pml_largest_margin.losses.functional": (
        "generalized_margin_softmax generalized_margin_softmax_head "
        "largest_margin_softmax largest_margin_softmax_head nontarget_logsumexp "
        "target_cosines"
    ),
    "pml_largest_margin.losses.fused": ("NORM_EPS column_dots fused_nontarget_logsumexp"),
    "pml_largest_margin.losses.generalized_margin_softmax_loss": ("GeneralizedMarginSoftmaxLoss"),
    "pml_largest_margin.losses.largest_margin_softmax_loss": ("LargestMarginSoftmaxLoss"),
    "pml_largest_margin.losses.margin_functions": (
        "additive_angular_margin additive_cosine_margin chebyshev_cosine_multiple "
        "combined_margin combined_margin_function multiplicative_angular_margin "
        "target_margin_function"
    ),
    "pml_largest_margin.losses.margin_presets_mixin": ("MarginPresetsMixin"),
    "pml_largest_margin.margins": (
        "ClassMargin class_margin class_margin_upper_bound cosine_logits "
        "max_over_sub_centers sample_margin_upper_bound sample_margins "
        "sample_margins_from_cosines"
    ),
    "pml_largest_margin.prototypes": (
        "SeparatedPrototypes freeze_prototypes max_separated_prototypes simplex_prototypes"
    ),
    "pml_largest_margin.regularizers": (
        "SampleMarginRegularizer SampleMarginRegularizerMixin ZeroCentroidRegularizer "
        "with_sample_margin_regularizer"
    ),
    "pml_largest_margin.regularizers.sample_margin_regularizer": ("SampleMarginRegularizer"),
    "pml_largest_margin.regularizers.sample_margin_regularizer_mixin": (
        "SampleMarginRegularizerMixin"
    ),
    "pml_largest_margin.regularizers.with_sample_margin_regularizer": (
        "with_sample_margin_regularizer"
    ),
    "pml_largest_margin.regularizers.zero_centroid_regularizer": ("ZeroCentroidRegularizer"),
}

MOVED = {
    "evaluation.identification": "evaluation.verification.identification",
    "evaluation.reid_top_k": "evaluation.reid.top_k",
    "evaluation.verification_kfold": "evaluation.verification.ten_fold",
    "evaluation.verification_roc": "evaluation.verification.pair_metrics",
    "evaluation.verification_templates": "evaluation.verification.templates",
    "evaluation.cli": "pml_largest_margin.cli",
    "evaluation.demo": "pml_largest_margin.demo",
    "evaluation.training": "pml_largest_margin.training",
    "evaluation.plotting": "pml_largest_margin.plotting",
}


def current_path(module: str) -> str:
    return MOVED.get(module, module)


@pytest.mark.parametrize("module", sorted(PUBLIC_NAMES))
def test_public_names_still_import(module):
    imported = importlib.import_module(current_path(module))
    missing = [name for name in PUBLIC_NAMES[module].split() if not hasattr(imported, name)]
    assert not missing


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_move_is_in_the_changelog(old):
    importlib.import_module(MOVED[old])
    line = f"`{old}` → `{MOVED[old]}`"
    said = line in README.read_text()
    assert said, f"the README changelog lacks {line}"


def test_the_old_paths_are_gone():
    # No compatibility shims: a moved module is gone from its old path, so nothing is defined twice.
    for old in MOVED:
        with pytest.raises(ImportError):
            importlib.import_module(old)


def test_the_command_entry_point():
    from pml_largest_margin.cli import main

    assert callable(main)


APPLICATION = (
    "pml_largest_margin.cli",
    "pml_largest_margin.demo",
    "pml_largest_margin.training",
    "pml_largest_margin.plotting",
)


def public_modules(application: bool) -> list[str]:
    """Every module of both packages without an underscore in its path: the library's, or (with
    ``application``) the application layer's (``cli``, ``demo``, ``training``, ``plotting``)."""
    names = []
    for package in ("evaluation", "pml_largest_margin"):
        root = importlib.import_module(package)
        for info in [None, *pkgutil.walk_packages(root.__path__, package + ".")]:
            name = package if info is None else info.name
            if any(part.startswith("_") for part in name.split(".")):
                continue
            in_application = any(name == a or name.startswith(a + ".") for a in APPLICATION)
            if in_application == application:
                names.append(name)
    return names


def public_callables(application: bool):
    """Public functions and classes defined in the public modules (not those they import)."""
    for module in public_modules(application):
        imported = importlib.import_module(module)
        for name, value in vars(imported).items():
            if name.startswith("_") or getattr(value, "__module__", None) != module:
                continue
            if inspect.isfunction(value) or inspect.isclass(value):
                yield f"{module}.{name}", value


def unannotated(function) -> list[str]:
    signature = inspect.signature(function)
    missing = [
        name
        for name, parameter in signature.parameters.items()
        if name not in ("self", "cls")
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        and parameter.annotation is inspect.Parameter.empty
    ]
    if signature.return_annotation is inspect.Signature.empty and function.__name__ != "__init__":
        missing.append("return")
    return missing


def methods_of(cls: type) -> dict:
    """Public methods (and ``__init__``) defined in the class body; properties by their getter."""
    methods = {}
    for name, member in vars(cls).items():
        if isinstance(member, staticmethod | classmethod):
            member = member.__func__
        elif isinstance(member, property):
            member = member.fget
        if inspect.isfunction(member) and (not name.startswith("_") or name == "__init__"):
            methods[name] = member
    return methods


def unhinted(application: bool) -> dict[str, list[str]]:
    problems = {}
    for qualified, value in public_callables(application):
        if inspect.isclass(value):
            for name, method in methods_of(value).items():
                if missing := unannotated(method):
                    problems[f"{qualified}.{name}"] = missing
        elif missing := unannotated(value):
            problems[qualified] = missing
    return problems


def test_the_hint_check_finds_unhinted_callables():
    assert "evaluation.verification.pair_metrics.roc" in dict(public_callables(False))
    assert "pml_largest_margin.cli.main" in dict(public_callables(True))

    def half_hinted(first: int, second) -> int:
        return first

    assert unannotated(half_hinted) == ["second"]
    assert unannotated(lambda value: value) == ["value", "return"]


def test_public_functions_and_methods_have_type_hints():
    assert not unhinted(application=False)


def test_application_functions_and_methods_have_type_hints():
    assert not unhinted(application=True)


# Literal defaults that several library functions share on purpose, with the reason.
SHARED_LITERAL_DEFAULTS = {
    ("m1", "1.0"): "m1 = 1, m2 = m3 = 0 is the margin function without margin, not a setting",
    ("m2", "0.0"): "see m1",
    ("m3", "0.0"): "see m1",
    ("sub_centers", "1"): "one prototype per class: no sub-centres",
    ("name", "'labels'"): "the argument name an error message states",
    ("seed", "0"): "an unrelated seed of each random procedure",
    (
        "metric",
        "'cosine'",
    ): "evaluation.sharded.sharded_top_k takes evaluation.knn.top_k's signature",
}


def literal_defaults(path: Path) -> list[tuple[str, str, str]]:
    """``(parameter, repr(default), function)`` of every literal default (not None or a bool)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        arguments = node.args
        positional = arguments.posonlyargs + arguments.args
        named = positional[len(positional) - len(arguments.defaults) :]
        pairs = list(zip(named, arguments.defaults, strict=True))
        keywords = zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True)
        pairs += [(a, d) for a, d in keywords if d is not None]
        for argument, default in pairs:
            try:
                value = ast.literal_eval(default)
            except ValueError:
                continue  # a named constant or an expression
            if value is not None and not isinstance(value, bool) and value not in ((), ""):
                found.append((argument.arg, repr(value), f"{path.name}:{node.name}"))
    return found


def test_each_library_default_is_defined_once():
    root = README.parent
    application = {Path(*module.split(".")) for module in APPLICATION}
    places: dict[tuple[str, str], set[str]] = {}
    for package in ("evaluation", "pml_largest_margin"):
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root).with_suffix("")
            if any(relative == a or a in relative.parents for a in application):
                continue
            for argument, value, where in literal_defaults(path):
                places.setdefault((argument, value), set()).add(where)
    assert len(places[("m1", "1.0")]) > 1  # the scan reads every signature
    repeated = {
        key: sorted(where)
        for key, where in places.items()
        if len(where) > 1 and key not in SHARED_LITERAL_DEFAULTS
    }
    assert not repeated, f"define these once (a DEFAULT_ constant) and import it: {repeated}"
