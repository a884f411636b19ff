"""Class-parallel losses on 2 gloo processes against single-process references (float64)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _distributed_harness import run_in_workers
from pytorch_metric_learning.regularizers import LpRegularizer
from references import reference_reid

from evaluation.knn import top_k
from evaluation.reid import ReIDResult, evaluate_reid_from_distances
from evaluation.sharded import sharded_reid_from_distances, sharded_top_k
from pml_largest_margin.distributed import (
    ClassParallelGeneralizedMarginSoftmaxLoss,
    ClassParallelLargestMarginSoftmaxLoss,
    ClassParallelZeroCentroidRegularizer,
    shard_bounds,
)
from pml_largest_margin.losses import GeneralizedMarginSoftmaxLoss, LargestMarginSoftmaxLoss
from pml_largest_margin.regularizers import (
    SampleMarginRegularizer,
    ZeroCentroidRegularizer,
)

NUM_CLASSES, EMBEDDING_SIZE, INPUT_SIZE, SCALE = 7, 6, 4, 3.0
# Uneven on purpose: 5 samples on rank 0 and 3 on rank 1, classes split 4 / 3.
BATCH_SIZES = (5, 3)


def _problem(tied_prototypes=False):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(sum(BATCH_SIZES), INPUT_SIZE, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 6, 3, 4, 3, 1, 5, 2])
    W = torch.randn(EMBEDDING_SIZE, NUM_CLASSES, generator=generator, dtype=torch.float64)
    if tied_prototypes:
        # Classes 1 (rank 0) and 5 (rank 1) share a direction: the non-target max is tied
        # across ranks for samples of other classes.
        W[:, 5] = 2 * W[:, 1]
    backbone = torch.nn.Linear(INPUT_SIZE, EMBEDDING_SIZE).double()
    with torch.no_grad():
        backbone.weight.copy_(torch.randn(backbone.weight.shape, generator=generator))
        backbone.bias.copy_(torch.randn(backbone.bias.shape, generator=generator))
    return inputs, labels, W, backbone


def _local_rows(tensor, rank):
    start = sum(BATCH_SIZES[:rank])
    return tensor[start : start + BATCH_SIZES[rank]]


def _numpy_grads(module):
    return [parameter.grad.detach().numpy().copy() for parameter in module.parameters()]


def _class_parallel_step(rank, loss_fn, tied_prototypes=False, indices_tuple=None):
    inputs, labels, W, backbone = _problem(tied_prototypes)
    loss_fn.load_full_W(W)
    model = torch.nn.parallel.DistributedDataParallel(backbone)
    loss = loss_fn(model(_local_rows(inputs, rank)), _local_rows(labels, rank), indices_tuple)
    loss.backward()
    return {
        "loss": loss.item(),
        "W_grad": loss_fn.W.grad.numpy().copy(),
        "class_range": loss_fn.class_range,
        "backbone_grads": _numpy_grads(model.module),
        "stats": _stats(loss_fn),
    }


def _stats(loss_fn):
    """The recorded stats of a loss and of its regularizers (empty without collect_stats)."""
    modules = {
        "loss": loss_fn,
        "sample margin": getattr(loss_fn, "sample_margin_regularizer", None),
        "weight": loss_fn.weight_regularizer,
    }
    return {
        (owner, name): getattr(module, name)
        for owner, module in modules.items()
        if module is not None and module.collect_stats
        for name in getattr(module, "_record_these_stats", [])
    }


def _reference_step(
    sample_margin_weight=0.0,
    centroid_weight=0.0,
    tied_prototypes=False,
    labels=None,
    sample_weights=None,
):
    """Straightforward single-process LM-Softmax on the full batch with the full W, by autograd,
    each sample's terms scaled by ``sample_weights`` (a miner's weights)."""
    inputs, problem_labels, W, backbone = _problem(tied_prototypes)
    labels = problem_labels if labels is None else labels
    W.requires_grad_(True)
    embeddings = torch.nn.functional.normalize(backbone(inputs), dim=1)
    cosines = embeddings @ torch.nn.functional.normalize(W, dim=0)
    target = cosines.gather(1, labels[:, None]).squeeze(1)
    is_target = torch.nn.functional.one_hot(labels, NUM_CLASSES).bool()
    non_target = cosines.masked_fill(is_target, -torch.inf)
    weights = 1.0 if sample_weights is None else sample_weights
    losses = torch.logsumexp(SCALE * (non_target - target[:, None]), dim=1) / SCALE
    loss = (losses * weights).mean()
    loss = loss + sample_margin_weight * ((non_target.amax(dim=1) - target) * weights).mean()
    centroid = torch.nn.functional.normalize(W, dim=0).mean(dim=1)
    loss = loss + centroid_weight * centroid.square().sum()
    loss.backward()
    return {"loss": loss.item(), "W_grad": W.grad.numpy(), "backbone_grads": _numpy_grads(backbone)}


def _single_process_class_step(loss_fn, indices_tuple=None, tied_prototypes=False):
    """The single-process loss class on the full batch with the full W."""
    inputs, labels, W, backbone = _problem(tied_prototypes)
    loss_fn = loss_fn.double()
    with torch.no_grad():
        loss_fn.W.copy_(W)
    loss = loss_fn(backbone(inputs), labels, indices_tuple)
    loss.backward()
    return {
        "loss": loss.item(),
        "W_grad": loss_fn.W.grad.numpy(),
        "backbone_grads": _numpy_grads(backbone),
        "stats": _stats(loss_fn),
    }


SAMPLE_MARGIN_WEIGHT, CENTROID_WEIGHT = 0.3, 0.7


def _regularized(loss_class, weight_regularizer, *args, preset=None, collect_stats=False, **kw):
    """``loss_class`` (or its ``preset``) with both regularizers and the test's weights."""
    build = loss_class if preset is None else functools.partial(loss_class.preset, preset)
    return build(
        *args,
        sample_margin_regularizer=SampleMarginRegularizer(collect_stats=collect_stats),
        sample_margin_reg_weight=SAMPLE_MARGIN_WEIGHT,
        weight_regularizer=weight_regularizer,
        weight_reg_weight=CENTROID_WEIGHT,
        collect_stats=collect_stats,
        **kw,
    )


def _single_process_zero_centroid(collect_stats=False):
    return ZeroCentroidRegularizer(record_class_margin=False, collect_stats=collect_stats)


# Triplets mined on each rank's own batch (positions 0..4 on rank 0, 0..2 on rank 1).
MINED_TRIPLETS = (
    (torch.tensor([0, 1, 1, 3]), torch.tensor([2, 3, 4, 3]), torch.tensor([4, 0, 1, 1])),
    (torch.tensor([0, 2]), torch.tensor([1, 1]), torch.tensor([2, 0])),
)


def _concatenated_triplets(per_rank):
    """The ranks' tuples as one tuple over the concatenated batch (None: no triplets)."""
    shifted = [
        [indices + sum(BATCH_SIZES[:rank]) for indices in triplets]
        for rank, triplets in enumerate(per_rank)
        if triplets is not None
    ]
    return tuple(torch.cat(parts) for parts in zip(*shifted, strict=True))


GM_SCALE = 4.0
ARCFACE_MARGIN = 0.5
GM_CASES = ("arcface", "cosface", "sphereface", "normface", "combined")


def _gm_loss(loss_class, case):
    if case == "combined":
        return loss_class(NUM_CLASSES, EMBEDDING_SIZE, scale=GM_SCALE, m1=2.0, m2=0.1, m3=0.2)
    margin = {"margin": ARCFACE_MARGIN} if case == "arcface" else {}
    return loss_class.preset(case, NUM_CLASSES, EMBEDDING_SIZE, scale=GM_SCALE, **margin)


# --- checks run inside the workers -------------------------------------------------------------


def check_lm_softmax(rank, world_size):
    loss_fn = ClassParallelLargestMarginSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE, scale=SCALE)
    return _class_parallel_step(rank, loss_fn.double())


def check_lm_softmax_with_regularizers(rank, world_size):
    loss_fn = _regularized(
        ClassParallelLargestMarginSoftmaxLoss,
        ClassParallelZeroCentroidRegularizer(collect_stats=True),
        NUM_CLASSES,
        EMBEDDING_SIZE,
        scale=SCALE,
        collect_stats=True,
    )
    return _class_parallel_step(rank, loss_fn.double(), tied_prototypes=True)


def check_gm_softmax_with_regularizers(rank, world_size):
    loss_fn = _regularized(
        ClassParallelGeneralizedMarginSoftmaxLoss,
        ClassParallelZeroCentroidRegularizer(form="sum"),
        NUM_CLASSES,
        EMBEDDING_SIZE,
        preset="arcface",
        scale=GM_SCALE,
        margin=ARCFACE_MARGIN,
    )
    return _class_parallel_step(rank, loss_fn.double())


def check_gm_softmax(rank, world_size):
    return {
        case: _class_parallel_step(
            rank, _gm_loss(ClassParallelGeneralizedMarginSoftmaxLoss, case).double()
        )
        for case in GM_CASES
    }


def check_mined_triplets(rank, world_size):
    lm = ClassParallelLargestMarginSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE, scale=SCALE)
    arcface = _gm_loss(ClassParallelGeneralizedMarginSoftmaxLoss, "arcface")
    inputs, labels, _, backbone = _problem()
    out_of_range = tuple(indices.clone() for indices in MINED_TRIPLETS[rank])
    out_of_range[1][0] = BATCH_SIZES[rank] if rank == 1 else 0
    embeddings = backbone(_local_rows(inputs, rank)).detach()
    return {
        "lm": _class_parallel_step(rank, lm.double(), indices_tuple=MINED_TRIPLETS[rank]),
        # Rank 1 mined nothing.
        "arcface": _class_parallel_step(
            rank, arcface.double(), indices_tuple=MINED_TRIPLETS[0] if rank == 0 else None
        ),
        "lm with sample margin": _class_parallel_step(
            rank,
            ClassParallelLargestMarginSoftmaxLoss(
                NUM_CLASSES,
                EMBEDDING_SIZE,
                scale=SCALE,
                sample_margin_regularizer=SampleMarginRegularizer(),
                sample_margin_reg_weight=SAMPLE_MARGIN_WEIGHT,
            ).double(),
            indices_tuple=MINED_TRIPLETS[rank],
        ),
        "index out of range on rank 1": _error_text(
            lambda: lm.double()(embeddings, _local_rows(labels, rank), out_of_range)
        ),
        "float indices": _error_text(
            lambda: lm(embeddings, _local_rows(labels, rank), (torch.zeros(1),) * 3)
        ),
    }


def check_half_precision_embeddings(rank, world_size):
    """float32 W with bfloat16 / float16 embeddings (and under autocast): computed in float32."""
    inputs, labels, W, backbone = _problem()
    loss_fn = _gm_loss(ClassParallelGeneralizedMarginSoftmaxLoss, "arcface")
    loss_fn.load_full_W(W.float())
    embeddings = backbone(_local_rows(inputs, rank)).detach().float()
    local_labels = _local_rows(labels, rank)
    results = {"float32": loss_fn(embeddings, local_labels).item()}
    for dtype in (torch.bfloat16, torch.float16):
        half = embeddings.to(dtype).requires_grad_(True)
        loss = loss_fn(half, local_labels)
        loss.backward()
        results[str(dtype)] = (loss.item(), str(loss.dtype), str(half.grad.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results["autocast"] = loss_fn(embeddings, local_labels).item()
    return results


def check_gm_constructor_errors(rank, world_size):
    loss_class = ClassParallelGeneralizedMarginSoftmaxLoss
    return {
        "unknown preset": _error_text(lambda: loss_class.preset("circleface", 4, 3)),
        "psi and margins": _error_text(lambda: loss_class(4, 3, m2=0.3, psi=torch.cos)),
        "psi not callable": _error_text(lambda: loss_class(4, 3, psi=0.5)),
        "m2 out of range": _error_text(lambda: loss_class(4, 3, m2=4.0)),
        "sample_rate 0": _error_text(lambda: loss_class(4, 3, sample_rate=0.0)),
        "sample_rate above 1": _error_text(lambda: loss_class(4, 3, sample_rate=1.5)),
        "infinite sample-margin weight": _error_text(
            lambda: loss_class(
                4,
                3,
                sample_margin_regularizer=SampleMarginRegularizer(),
                sample_margin_reg_weight=float("inf"),
            )
        ),
        "preset arguments": loss_class.preset("cosface", 4, 3, margin=0.2).m3,
        "numpy and torch scales": [
            loss_class(4, 3, scale=np.float32(16)).scale,
            ClassParallelLargestMarginSoftmaxLoss(4, 3, scale=torch.tensor(16.0)).scale,
        ],
        "bool scale": _error_text(lambda: ClassParallelLargestMarginSoftmaxLoss(4, 3, scale=True)),
        "float num_classes": _error_text(lambda: loss_class(4.0, 3)),
        "infinite sphereface margin": _error_text(
            lambda: loss_class.preset("sphereface", 4, 3, margin=float("inf"))
        ),
        "zero sample rate": _error_text(lambda: loss_class(4, 3, sample_rate=0.0)),
        "sample rate above 1": _error_text(
            lambda: ClassParallelLargestMarginSoftmaxLoss(4, 3, sample_rate=1.5)
        ),
        "too few classes for the ranks": _error_text(lambda: loss_class(world_size - 1, 3)),
    }


def check_zero_centroid_forms(rank, world_size):
    _, _, W, _ = _problem()
    results = {}
    for form in ("mean", "sum"):
        slice_ = W[:, slice(*shard_bounds(NUM_CLASSES, world_size, rank))].clone()
        slice_.requires_grad_(True)
        value = ClassParallelZeroCentroidRegularizer(form=form)(slice_.t())
        value.backward()
        results[form] = (value.item(), slice_.grad.numpy().copy())
    results["bad form"] = _error_text(lambda: ClassParallelZeroCentroidRegularizer(form="avg"))
    regularizer = ClassParallelZeroCentroidRegularizer()
    local = W[:, slice(*shard_bounds(NUM_CLASSES, world_size, rank))]
    with_zero_column, with_nan = local.clone(), local.clone()
    with_zero_column[:, 0] = 0 if rank == 1 else with_zero_column[:, 0]
    with_nan[0, 0] = torch.nan if rank == 0 else with_nan[0, 0]
    one_class_in_all = W[:, :1] if rank == 0 else W[:, :0]
    results["zero prototype on rank 1"] = _error_text(lambda: regularizer(with_zero_column.t()))
    results["NaN on rank 0"] = _error_text(lambda: regularizer(with_nan.t()))
    results["one class in all"] = _error_text(lambda: regularizer(one_class_in_all.t()))
    results["1-D weights on rank 0"] = _error_text(
        lambda: regularizer(W[0] if rank == 0 else W.t())
    )
    form_per_rank = ClassParallelZeroCentroidRegularizer(form=("mean", "sum")[rank])
    results["form differs across ranks"] = _error_text(lambda: form_per_rank(local.t()))
    # The group must still be usable after the errors: every rank took part in each exchange.
    results["valid call afterwards"] = _error_text(lambda: regularizer(W.t()))
    return results


# Two classes in the batch, one per rank, so that sampling has negatives to drop.
SAMPLING_LABELS = torch.tensor([0, 4, 4, 0, 0, 4, 0, 4])


def check_class_sampling(rank, world_size):
    inputs, _, W, backbone = _problem()
    labels = SAMPLING_LABELS
    loss_fn = ClassParallelLargestMarginSoftmaxLoss(
        NUM_CLASSES,
        EMBEDDING_SIZE,
        scale=SCALE,
        sample_rate=0.5,
        generator=torch.Generator().manual_seed(rank),
    ).double()
    loss_fn.load_full_W(W)
    embeddings = backbone(_local_rows(inputs, rank))
    sampled = loss_fn(embeddings, _local_rows(labels, rank))
    sampled.backward()
    gradient_columns = loss_fn.W.grad.abs().sum(dim=0) > 0
    loss_fn.eval()
    exact = loss_fn(embeddings.detach(), _local_rows(labels, rank)).item()
    return {
        "sampled": sampled.item(),
        "exact_in_eval_mode": exact,
        "columns_with_gradient": gradient_columns.nonzero().squeeze(1).tolist(),
        "class_range": loss_fn.class_range,
        "batch_classes": sorted(set(labels.tolist())),
    }


def _error_text(call):
    try:
        call()
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def check_bad_inputs(rank, world_size):
    inputs, labels, W, backbone = _problem()
    loss_fn = ClassParallelLargestMarginSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE).double()
    embeddings = backbone(_local_rows(inputs, rank)).detach()
    good_labels = _local_rows(labels, rank)
    out_of_range = good_labels.clone()
    out_of_range[0] = NUM_CLASSES if rank == 1 else out_of_range[0]
    with_nan = embeddings.clone()
    with_nan[0, 0] = torch.nan if rank == 0 else with_nan[0, 0]
    wrong_width = embeddings[:, :-1] if rank == 1 else embeddings
    mixed_dtype = embeddings.float() if rank == 0 else embeddings
    errors = {
        "label out of range on rank 1": _error_text(lambda: loss_fn(embeddings, out_of_range)),
        "NaN on rank 0": _error_text(lambda: loss_fn(with_nan, good_labels)),
        "wrong dimension on rank 1": _error_text(lambda: loss_fn(wrong_width, good_labels)),
        "dtypes differ across ranks": _error_text(lambda: loss_fn(mixed_dtype, good_labels)),
        "float labels": _error_text(lambda: loss_fn(embeddings, good_labels.double())),
    }
    # The group must still be usable after the errors: every rank took part in each exchange.
    errors["valid call afterwards"] = _error_text(lambda: loss_fn(embeddings, good_labels))
    return errors


def _reid_problem():
    rng = np.random.default_rng(3)
    num_query, num_gallery = 20, 53
    # Distances on a coarse grid: many ties, which must be broken by global gallery index.
    distances = np.round(rng.random((num_query, num_gallery)), 1)
    q_pids, g_pids = rng.integers(0, 8, num_query), rng.integers(0, 8, num_gallery)
    q_camids, g_camids = rng.integers(0, 3, num_query), rng.integers(0, 3, num_gallery)
    q_pids[0] = 8  # in no shard of the gallery: a skipped query
    queries = rng.standard_normal((num_query, 8)).astype(np.float32)
    gallery = rng.standard_normal((num_gallery, 8)).astype(np.float32)
    return distances, q_pids, g_pids, q_camids, g_camids, queries, gallery


def check_sharded_evaluation(rank, world_size):
    distances, q_pids, g_pids, q_camids, g_camids, queries, gallery = _reid_problem()
    start, stop = shard_bounds(distances.shape[1], world_size, rank)
    results = {
        "reid": sharded_reid_from_distances(
            distances[:, start:stop], q_pids, g_pids[start:stop], q_camids, g_camids[start:stop],
            max_rank=10,
        )
    }  # fmt: skip
    for k in (5, 40):  # 40 exceeds each shard's size
        results[f"top_{k}"] = sharded_top_k(queries, gallery[start:stop], k, metric="l2")
    results["k too large"] = _error_text(lambda: sharded_top_k(queries, gallery[start:stop], 54))
    return results


def _gallery_split(num_gallery, rank, empty_rank):
    """Rank ``empty_rank`` holds no gallery item, the other rank all of them."""
    return (0, 0) if rank == empty_rank else (0, num_gallery)


def check_sharded_evaluation_with_empty_shards(rank, world_size):
    distances, q_pids, g_pids, q_camids, g_camids, queries, gallery = _reid_problem()
    results = {}
    for empty_rank in (0, 1):
        start, stop = _gallery_split(distances.shape[1], rank, empty_rank)
        results[f"reid, rank {empty_rank} empty"] = sharded_reid_from_distances(
            distances[:, start:stop], q_pids, g_pids[start:stop], q_camids, g_camids[start:stop],
            max_rank=10,
        )  # fmt: skip
        results[f"top_5, rank {empty_rank} empty"] = sharded_top_k(
            queries, gallery[start:stop], 5, metric="l2"
        )
    # A one-item gallery: smaller than the world size, so rank 1's shard is empty.
    start, stop = shard_bounds(1, world_size, rank)
    results["one-item gallery"] = sharded_reid_from_distances(
        distances[:, start:stop], q_pids, g_pids[start:stop], q_camids, g_camids[start:stop]
    )
    results["top_1 of a one-item gallery"] = sharded_top_k(queries, gallery[start:stop], 1)
    start, stop = shard_bounds(distances.shape[1], world_size, rank)
    local = (distances[:, start:stop], q_pids, g_pids[start:stop], q_camids, g_camids[start:stop])
    with_nan = local[0].copy()
    with_nan[0, 0] = np.nan if rank == 1 else with_nan[0, 0]
    other_pids = q_pids + rank
    results["errors"] = {
        "NaN distance on rank 1": _error_text(
            lambda: sharded_reid_from_distances(with_nan, *local[1:])
        ),
        "q_pids differ across ranks": _error_text(
            lambda: sharded_reid_from_distances(local[0], other_pids, *local[2:])
        ),
        "max_rank differs across ranks": _error_text(
            lambda: sharded_reid_from_distances(*local, max_rank=5 + rank)
        ),
        "bad metric on rank 0": _error_text(
            lambda: sharded_top_k(queries, gallery[start:stop], 3, "l1" if rank == 0 else "l2")
        ),
        "k differs across ranks": _error_text(
            lambda: sharded_top_k(queries, gallery[start:stop], 3 + rank)
        ),
        "gallery dimension on rank 1": _error_text(
            lambda: sharded_top_k(queries, gallery[start:stop, : 8 - rank], 3)
        ),
    }
    # Every rank took part in each exchange: the group is still usable.
    results["valid call afterwards"] = sharded_reid_from_distances(*local, max_rank=10)
    return results


def check_settings_that_differ_across_ranks(rank, world_size):
    """Each case builds a different loss on each rank and calls it with valid local input."""
    inputs, labels, W, backbone = _problem()
    local_labels = _local_rows(labels, rank)
    embeddings = backbone(_local_rows(inputs, rank)).detach()

    def lm(**kwargs):
        return ClassParallelLargestMarginSoftmaxLoss(
            kwargs.pop("num_classes", NUM_CLASSES),
            kwargs.pop("embedding_size", EMBEDDING_SIZE),
            **{"scale": SCALE, **kwargs},
        ).double()

    def call(loss_fn, width=EMBEDDING_SIZE):
        return _error_text(lambda: loss_fn(embeddings[:, :width], local_labels))

    other = rank == 1
    return {
        "num_classes": call(lm(num_classes=9 if other else NUM_CLASSES)),
        "scale": call(lm(scale=SCALE + other)),
        "embedding_size": call(lm(embedding_size=EMBEDDING_SIZE - other), EMBEDDING_SIZE - other),
        "loss class": call(
            _gm_loss(ClassParallelGeneralizedMarginSoftmaxLoss, "cosface").double()
            if other
            else lm()
        ),
        "arcface margin": call(
            ClassParallelGeneralizedMarginSoftmaxLoss.preset(
                "arcface", NUM_CLASSES, EMBEDDING_SIZE, margin=0.5 - 0.1 * other
            ).double()
        ),
        "sample_rate": call(lm(sample_rate=1.0 - 0.5 * other)),
        "weight regularizer on rank 1 only": call(
            lm(weight_regularizer=ClassParallelZeroCentroidRegularizer() if other else None)
        ),
        "zero-centroid form": call(
            lm(weight_regularizer=ClassParallelZeroCentroidRegularizer(form=("mean", "sum")[rank]))
        ),
        "embedding regularizer on rank 1 only": call(
            lm(embedding_regularizer=LpRegularizer() if other else None)
        ),
        "sample-margin weight": call(
            lm(
                sample_margin_regularizer=SampleMarginRegularizer(),
                sample_margin_reg_weight=0.1 * (1 + other),
            )
        ),
        # 32 and 32.0 are the same setting: no error.
        "int and float scale agree": call(lm(scale=(32, 32.0)[rank])),
        "valid call afterwards": call(lm()),
    }


def check_half_precision_matches_single_process(rank, world_size):
    """bfloat16 / float16 embeddings with float32 W, for the comparison with the single-process
    losses on the same half-precision inputs."""
    inputs, labels, W, backbone = _problem()
    embeddings = backbone(_local_rows(inputs, rank)).detach().float()
    results = {}
    for case in ("lm", "arcface"):
        if case == "lm":
            loss_fn = ClassParallelLargestMarginSoftmaxLoss(
                NUM_CLASSES, EMBEDDING_SIZE, scale=SCALE
            )
        else:
            loss_fn = _gm_loss(ClassParallelGeneralizedMarginSoftmaxLoss, case)
        loss_fn.load_full_W(W.float())
        for dtype in (torch.bfloat16, torch.float16):
            loss_fn.W.grad = None
            half = embeddings.to(dtype).requires_grad_(True)
            loss = loss_fn(half, _local_rows(labels, rank))
            loss.backward()
            results[case, str(dtype)] = {
                "loss": loss.item(),
                "W_grad": loss_fn.W.grad.numpy().copy(),
                "embedding_grad": half.grad.float().numpy(),
            }
    return results


def _with_both_regularizers(loss_class, *args, **kwargs):
    return _regularized(loss_class, *args, **kwargs)


def check_empty_batches(rank, world_size):
    """Every rank empty, and only rank 1 empty, with both regularizers."""
    inputs, labels, W, backbone = _problem()
    results = {}
    for case, rows in (("every rank empty", slice(0, 0)), ("rank 1 empty", None)):
        loss_fn = _regularized(
            ClassParallelLargestMarginSoftmaxLoss,
            ClassParallelZeroCentroidRegularizer(),
            NUM_CLASSES,
            EMBEDDING_SIZE,
            scale=SCALE,
            collect_stats=True,
        ).double()
        loss_fn.load_full_W(W)
        if rows is None:  # rank 0 holds the whole batch
            rows = slice(0, len(labels)) if rank == 0 else slice(0, 0)
        local = backbone(inputs[rows]).detach().requires_grad_(True)
        loss = loss_fn(local, labels[rows])
        loss.backward()
        results[case] = {
            "loss": loss.item(),
            "W_grad": loss_fn.W.grad.numpy().copy(),
            "embedding_grad": local.grad.numpy().copy(),
            "class_range": loss_fn.class_range,
        }
    # float32 W, bfloat16 embeddings, empty everywhere: computed (and reduced) in float32.
    loss_fn = _regularized(
        ClassParallelLargestMarginSoftmaxLoss,
        ClassParallelZeroCentroidRegularizer(),
        NUM_CLASSES,
        EMBEDDING_SIZE,
        scale=SCALE,
    )
    loss_fn.load_full_W(W.float())
    loss = loss_fn(torch.zeros(0, EMBEDDING_SIZE, dtype=torch.bfloat16), labels[:0])
    results["every rank empty, bfloat16"] = (loss.item(), str(loss.dtype))
    return results


# 100 classes, 50 per rank; sample_rate 0.05 keeps ceil(2.5) = 3 classes of each rank. The batch
# holds 2 classes of each rank, so 1 random class joins them: batch classes dropped by the draw
# would leave their samples without a target.
PRIORITY_CLASSES, PRIORITY_RATE = 100, 0.05
PRIORITY_LABELS = (torch.tensor([10, 60, 37, 91, 10]), torch.tensor([91, 60, 37]))
PRIORITY_SEEDS = range(8)


def _priority_problem():
    generator = torch.Generator().manual_seed(5)
    W = torch.randn(EMBEDDING_SIZE, PRIORITY_CLASSES, generator=generator, dtype=torch.float64)
    embeddings = [
        torch.randn(len(labels), EMBEDDING_SIZE, generator=generator, dtype=torch.float64)
        for labels in PRIORITY_LABELS
    ]
    return W, embeddings


def check_class_sampling_priority(rank, world_size):
    W, embeddings = _priority_problem()
    results = []
    for seed in PRIORITY_SEEDS:
        loss_fn = ClassParallelLargestMarginSoftmaxLoss(
            PRIORITY_CLASSES,
            EMBEDDING_SIZE,
            scale=SCALE,
            sample_rate=PRIORITY_RATE,
            generator=torch.Generator().manual_seed(100 * seed + rank),
        ).double()
        loss_fn.load_full_W(W)
        loss = loss_fn(embeddings[rank], PRIORITY_LABELS[rank])
        loss.backward()
        start = loss_fn.class_range[0]
        with_gradient = loss_fn.W.grad.abs().sum(dim=0) > 0
        kept = (start + with_gradient.nonzero().squeeze(1)).tolist()
        results.append({"loss": loss.item(), "kept": kept, "class_range": loss_fn.class_range})
    return results


def check_recorded_settings(rank, world_size):
    loss_fn = ClassParallelLargestMarginSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE, scale=SCALE)
    generator = torch.Generator().manual_seed(5)
    sampled = ClassParallelLargestMarginSoftmaxLoss(
        NUM_CLASSES, EMBEDDING_SIZE, scale=SCALE, sample_rate=1.0, generator=generator
    )
    state = generator.get_state()
    columns, _ = sampled.train()._scored_columns(torch.tensor([0, 1]))
    # At sample_rate 1 training scores W itself: no copy of W, no random draw.
    untouched = columns is sampled.W and torch.equal(generator.get_state(), state)
    return sorted(loss_fn._record_these), loss_fn.class_range, untouched


CHECKS = [
    check_recorded_settings,
    check_settings_that_differ_across_ranks,
    check_half_precision_matches_single_process,
    check_empty_batches,
    check_class_sampling_priority,
    check_sharded_evaluation,
    check_sharded_evaluation_with_empty_shards,
    check_lm_softmax,
    check_lm_softmax_with_regularizers,
    check_gm_softmax_with_regularizers,
    check_gm_softmax,
    check_gm_constructor_errors,
    check_mined_triplets,
    check_half_precision_embeddings,
    check_zero_centroid_forms,
    check_class_sampling,
    check_bad_inputs,
]


@pytest.fixture(scope="module")
def worker_results():
    return run_in_workers(CHECKS)


def _results(worker_results, check):
    per_rank = [worker_results[rank][check.__name__] for rank in sorted(worker_results)]
    for result in per_rank:
        if isinstance(result, Exception):
            raise result
    return per_rank


# --- tests ------------------------------------------------------------------------------------


def test_shard_bounds_cover_every_class_once():
    for num_items in range(0, 12):
        for world_size in range(1, 5):
            bounds = [shard_bounds(num_items, world_size, rank) for rank in range(world_size)]
            covered = [item for start, stop in bounds for item in range(start, stop)]
            assert covered == list(range(num_items))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard_bounds(5, 2, 2)


def test_loss_requires_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed"):
        ClassParallelLargestMarginSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE)


def _assert_matches_single_process(per_rank, reference):
    for result in per_rank:
        assert result["loss"] == pytest.approx(reference["loss"], abs=1e-6, rel=1e-6)
    assert [result["class_range"] for result in per_rank] == [(0, 4), (4, 7)]
    for result in per_rank:
        start, stop = result["class_range"]
        np.testing.assert_allclose(
            result["W_grad"], reference["W_grad"][:, start:stop], rtol=1e-6, atol=1e-9
        )
        # DDP has averaged over the ranks: every rank holds the single-process gradient.
        for got, expected in zip(
            result["backbone_grads"], reference["backbone_grads"], strict=True
        ):
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


def test_lm_softmax_matches_single_process(worker_results):
    _assert_matches_single_process(_results(worker_results, check_lm_softmax), _reference_step())


def test_lm_softmax_matches_single_process_loss_class(worker_results):
    reference = _single_process_class_step(
        LargestMarginSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE, scale=SCALE)
    )
    _assert_matches_single_process(_results(worker_results, check_lm_softmax), reference)


def test_arcface_case_covers_the_fallback_region():
    inputs, labels, W, backbone = _problem()
    unit = torch.nn.functional.normalize(backbone(inputs), dim=1)
    cosines = unit @ torch.nn.functional.normalize(W, dim=0)
    angles = torch.acos(cosines.gather(1, labels[:, None]).squeeze(1))
    beyond = angles > torch.pi - ARCFACE_MARGIN
    assert beyond.any() and not beyond.all()


@pytest.mark.parametrize("case", GM_CASES)
def test_gm_softmax_matches_single_process_loss_class(worker_results, case):
    reference = _single_process_class_step(_gm_loss(GeneralizedMarginSoftmaxLoss, case))
    per_rank = [result[case] for result in _results(worker_results, check_gm_softmax)]
    _assert_matches_single_process(per_rank, reference)


def test_mined_triplets_weight_samples_as_in_single_process(worker_results):
    per_rank = _results(worker_results, check_mined_triplets)
    lm_reference = _single_process_class_step(
        LargestMarginSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE, scale=SCALE),
        _concatenated_triplets(MINED_TRIPLETS),
    )
    _assert_matches_single_process([result["lm"] for result in per_rank], lm_reference)
    arcface_reference = _single_process_class_step(
        _gm_loss(GeneralizedMarginSoftmaxLoss, "arcface"),
        _concatenated_triplets((MINED_TRIPLETS[0], None)),
    )
    _assert_matches_single_process([result["arcface"] for result in per_rank], arcface_reference)
    # Mined-sample counts over the concatenated triplets, divided by the largest count.
    counts = torch.bincount(torch.cat(_concatenated_triplets(MINED_TRIPLETS)), minlength=8)
    with_margin = _reference_step(
        sample_margin_weight=SAMPLE_MARGIN_WEIGHT, sample_weights=counts.double() / counts.max()
    )
    _assert_matches_single_process(
        [result["lm with sample margin"] for result in per_rank], with_margin
    )
    with_margin_class = _single_process_class_step(
        LargestMarginSoftmaxLoss(
            NUM_CLASSES,
            EMBEDDING_SIZE,
            scale=SCALE,
            sample_margin_regularizer=SampleMarginRegularizer(),
            sample_margin_reg_weight=SAMPLE_MARGIN_WEIGHT,
        ),
        _concatenated_triplets(MINED_TRIPLETS),
    )
    _assert_matches_single_process(
        [result["lm with sample margin"] for result in per_rank], with_margin_class
    )
    # The weights matter: without them the loss differs.
    unweighted = _single_process_class_step(
        LargestMarginSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE, scale=SCALE)
    )
    assert abs(unweighted["loss"] - lm_reference["loss"]) > 1e-3
    for result in per_rank:
        assert "ValueError" in result["index out of range on rank 1"]
        assert result["float indices"].startswith("TypeError")
    assert "[0, 2]" in per_rank[1]["index out of range on rank 1"]


def test_half_precision_embeddings_are_computed_in_float32(worker_results):
    for result in _results(worker_results, check_half_precision_embeddings):
        exact = result["float32"]
        for dtype, tolerance in (("torch.bfloat16", 2e-2), ("torch.float16", 2e-3)):
            value, loss_dtype, grad_dtype = result[dtype]
            assert value == pytest.approx(exact, rel=tolerance)
            assert (loss_dtype, grad_dtype) == ("torch.float32", dtype)
        # Autocast leaves the loss alone: the float32 embeddings give the float32 value.
        assert result["autocast"] == pytest.approx(exact, rel=1e-6)


def test_gm_softmax_constructor_errors(worker_results):
    for errors in _results(worker_results, check_gm_constructor_errors):
        assert errors.pop("preset arguments") == 0.2
        assert "unknown preset" in errors.pop("unknown preset")
        assert errors.pop("psi not callable").startswith("TypeError: psi must be callable")
        assert errors.pop("numpy and torch scales") == [16.0, 16.0]
        assert errors.pop("bool scale").startswith("TypeError: scale must be a real number")
        assert errors.pop("float num_classes").startswith(
            "TypeError: num_classes must be an integer"
        )
        for case, error in errors.items():
            assert error is not None and error.startswith("ValueError"), (case, error)


def test_regularizers_match_single_process_with_tied_maxima(worker_results):
    reference = _reference_step(
        sample_margin_weight=SAMPLE_MARGIN_WEIGHT,
        centroid_weight=CENTROID_WEIGHT,
        tied_prototypes=True,
    )
    per_rank = _results(worker_results, check_lm_softmax_with_regularizers)
    _assert_matches_single_process(per_rank, reference)


def test_regularizers_match_single_process_regularizers_and_stats(worker_results):
    """Against the single-process loss carrying SampleMarginRegularizer and
    ZeroCentroidRegularizer: values, gradients and the recorded stats of the global batch."""
    single = _single_process_class_step(
        _regularized(
            LargestMarginSoftmaxLoss,
            _single_process_zero_centroid(collect_stats=True),
            NUM_CLASSES,
            EMBEDDING_SIZE,
            scale=SCALE,
            collect_stats=True,
            record_class_margin=False,  # needs the whole W: the sharded loss does not record it
        ),
        tied_prototypes=True,
    )
    expected_stats = single["stats"]
    assert set(expected_stats) == {
        ("loss", "mean_sample_margin"),
        ("loss", "min_sample_margin"),
        ("sample margin", "mean_sample_margin"),
        ("sample margin", "min_sample_margin"),
        ("weight", "centroid_norm"),
    }
    per_rank = _results(worker_results, check_lm_softmax_with_regularizers)
    _assert_matches_single_process(per_rank, single)
    for result in per_rank:
        assert set(result["stats"]) == set(expected_stats)
        for key, value in expected_stats.items():
            assert result["stats"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_gm_softmax_with_regularizers_matches_single_process(worker_results):
    single = _single_process_class_step(
        _regularized(
            GeneralizedMarginSoftmaxLoss,
            ZeroCentroidRegularizer(form="sum", record_class_margin=False),
            NUM_CLASSES,
            EMBEDDING_SIZE,
            preset="arcface",
            scale=GM_SCALE,
            margin=ARCFACE_MARGIN,
        )
    )
    per_rank = _results(worker_results, check_gm_softmax_with_regularizers)
    _assert_matches_single_process(per_rank, single)


def test_zero_centroid_forms_match_single_process(worker_results):
    _, _, W, _ = _problem()
    W.requires_grad_(True)
    centroid_sum = torch.nn.functional.normalize(W, dim=0).sum(dim=1)
    per_rank = _results(worker_results, check_zero_centroid_forms)
    for form, divisor in (("mean", NUM_CLASSES**2), ("sum", 1)):
        W.grad = None
        single = ZeroCentroidRegularizer(form=form, record_class_margin=False)(W.t())
        assert single.item() == pytest.approx((centroid_sum.square().sum() / divisor).item())
        single.backward()
        for rank, result in enumerate(per_rank):
            value, grad = result[form]
            assert value == pytest.approx(single.item(), rel=1e-12)
            columns = slice(*shard_bounds(NUM_CLASSES, 2, rank))
            np.testing.assert_allclose(grad, W.grad[:, columns].numpy(), rtol=1e-10)


def test_zero_centroid_bad_prototypes_raise_on_every_rank(worker_results):
    per_rank = _results(worker_results, check_zero_centroid_forms)
    for result in per_rank:
        assert result.pop("valid call afterwards") is None
        assert result["bad form"].startswith("ValueError: form must be one of")
        assert "at least 2 classes, got 1" in result["one class in all"]
    assert "zero prototype row" in per_rank[1]["zero prototype on rank 1"]
    assert "rank(s) [1]" in per_rank[0]["zero prototype on rank 1"]
    assert "NaN or Inf" in per_rank[0]["NaN on rank 0"]
    assert "rank(s) [0]" in per_rank[1]["NaN on rank 0"]
    assert "2-D floating-point" in per_rank[0]["1-D weights on rank 0"]
    assert "rank(s) [0]" in per_rank[1]["1-D weights on rank 0"]
    for result in per_rank:
        assert "form differs across ranks: ['mean', 'sum']" in result["form differs across ranks"]
    # The single-process regularizer rejects the same prototypes.
    _, _, W, _ = _problem()
    W[:, 5] = 0
    with pytest.raises(ValueError, match="zero prototype row"):
        ZeroCentroidRegularizer()(W.t())
    with pytest.raises(ValueError, match="at least 2 classes"):
        ZeroCentroidRegularizer()(W[:, :1].t())


def test_class_sampling_keeps_batch_classes_and_drops_others(worker_results):
    per_rank = _results(worker_results, check_class_sampling)
    assert per_rank[0]["sampled"] == per_rank[1]["sampled"]
    exact = _reference_step(labels=SAMPLING_LABELS)["loss"]
    assert per_rank[0]["exact_in_eval_mode"] == pytest.approx(exact, rel=1e-9)
    for result in per_rank:
        start, stop = result["class_range"]
        columns = [start + column for column in result["columns_with_gradient"]]
        positives = [label for label in result["batch_classes"] if start <= label < stop]
        # Half of each rank's classes are kept (rounded up), the batch's classes always among them.
        assert set(positives) <= set(columns)
        assert len(columns) == max(len(positives), -(-(stop - start) // 2))
    # Dropping negatives from the denominator can only lower LM-Softmax.
    assert per_rank[0]["sampled"] < per_rank[0]["exact_in_eval_mode"]


def test_bad_inputs_raise_on_every_rank(worker_results):
    per_rank = _results(worker_results, check_bad_inputs)
    for errors in per_rank:
        assert errors.pop("valid call afterwards") is None
        for case, error in errors.items():
            assert error is not None, case
            assert error.startswith(("ValueError", "TypeError")), (case, error)
    assert "labels must lie in [0, 6]" in per_rank[1]["label out of range on rank 1"]
    assert "rank(s) [1]" in per_rank[0]["label out of range on rank 1"]
    assert "NaN" in per_rank[0]["NaN on rank 0"]
    assert "different dtypes" in per_rank[1]["dtypes differ across ranks"]


def test_sharded_reid_equals_single_process(worker_results):
    per_rank = _results(worker_results, check_sharded_evaluation)
    distances, q_pids, g_pids, q_camids, g_camids, _, _ = _reid_problem()
    reference = reference_reid(distances, q_pids, g_pids, q_camids, g_camids, 10)
    mean_ap, mean_inp, cmc = reference.mAP, reference.mINP, reference.cmc
    single = evaluate_reid_from_distances(
        distances, q_pids, g_pids, q_camids, g_camids, max_rank=10
    )
    assert single.num_skipped_queries > 0  # skipped queries are part of the check
    for result in per_rank:
        reid = result["reid"]
        assert isinstance(reid, ReIDResult)
        assert reid.mAP == pytest.approx(mean_ap, rel=1e-12)
        assert reid.mINP == pytest.approx(mean_inp, rel=1e-12)
        np.testing.assert_allclose(reid.cmc, cmc, rtol=1e-12)
        # Bit-identical to the single-process evaluator on the whole matrix.
        np.testing.assert_array_equal(reid.average_precision, single.average_precision)
        np.testing.assert_array_equal(reid.cmc, single.cmc)
        assert (reid.mAP, reid.mINP) == (single.mAP, single.mINP)
        assert reid.num_valid_queries == single.num_valid_queries
        assert reid.num_skipped_queries == single.num_skipped_queries


def test_sharded_top_k_equals_single_process(worker_results):
    per_rank = _results(worker_results, check_sharded_evaluation)
    _, _, _, _, _, queries, gallery = _reid_problem()
    for k in (5, 40):
        scores, indices = top_k(queries, gallery, k, metric="l2")
        for result in per_rank:
            merged_scores, merged_indices = result[f"top_{k}"]
            np.testing.assert_array_equal(merged_indices, indices)
            np.testing.assert_allclose(merged_scores, scores, rtol=1e-5)
    for result in per_rank:
        assert result["k too large"].startswith("ValueError: k must lie in [1, 53]")


def _assert_same_reid(got, expected):
    assert isinstance(got, ReIDResult)
    np.testing.assert_array_equal(got.average_precision, expected.average_precision)
    np.testing.assert_array_equal(got.cmc, expected.cmc)
    assert (got.mAP, got.mINP) == (expected.mAP, expected.mINP)
    assert (got.num_valid_queries, got.num_skipped_queries) == (
        expected.num_valid_queries,
        expected.num_skipped_queries,
    )


def test_sharded_evaluation_with_empty_shards_equals_single_process(worker_results):
    per_rank = _results(worker_results, check_sharded_evaluation_with_empty_shards)
    distances, q_pids, g_pids, q_camids, g_camids, queries, gallery = _reid_problem()
    single = evaluate_reid_from_distances(
        distances, q_pids, g_pids, q_camids, g_camids, max_rank=10
    )
    one_item = evaluate_reid_from_distances(
        distances[:, :1], q_pids, g_pids[:1], q_camids, g_camids[:1]
    )
    assert one_item.num_valid_queries > 0
    scores, indices = top_k(queries, gallery, 5, metric="l2")
    one_scores, one_indices = top_k(queries, gallery[:1], 1)
    for result in per_rank:
        for empty_rank in (0, 1):
            _assert_same_reid(result[f"reid, rank {empty_rank} empty"], single)
            merged_scores, merged_indices = result[f"top_5, rank {empty_rank} empty"]
            np.testing.assert_array_equal(merged_indices, indices)
            np.testing.assert_allclose(merged_scores, scores, rtol=1e-5)
        _assert_same_reid(result["one-item gallery"], one_item)
        merged_scores, merged_indices = result["top_1 of a one-item gallery"]
        np.testing.assert_array_equal(merged_indices, one_indices)
        np.testing.assert_allclose(merged_scores, one_scores, rtol=1e-6)
        _assert_same_reid(result["valid call afterwards"], single)
        for case, error in result["errors"].items():
            assert error is not None and error.startswith("ValueError"), (case, error)
    errors = [result["errors"] for result in per_rank]
    assert "NaN" in errors[1]["NaN distance on rank 1"]
    assert "rank(s) [1]" in errors[0]["NaN distance on rank 1"]
    assert "metric must be one of" in errors[0]["bad metric on rank 0"]
    assert "rank(s) [0]" in errors[1]["bad metric on rank 0"]
    assert "rank(s) [1]" in errors[0]["gallery dimension on rank 1"]
    for error in errors:
        assert "q_pids (checksum) differs across ranks" in error["q_pids differ across ranks"]
        assert "max_rank differs across ranks: [5, 6]" in error["max_rank differs across ranks"]
        assert "k differs across ranks: [3, 4]" in error["k differs across ranks"]


def test_settings_that_differ_across_ranks_raise_the_same_error_on_every_rank(worker_results):
    per_rank = _results(worker_results, check_settings_that_differ_across_ranks)
    for result in per_rank:
        assert result.pop("valid call afterwards") is None
        assert result.pop("int and float scale agree") is None
    expected = {
        "num_classes": "num_classes: [7, 9]",
        "scale": "scale: [3, 4]",
        "embedding_size": "embedding_size: [6, 5]",
        "loss class": "loss: ['ClassParallelLargestMarginSoftmaxLoss', "
        "'ClassParallelGeneralizedMarginSoftmaxLoss']",
        "arcface margin": "m2: [0.5, 0.4]",
        "sample_rate": "sample_rate: [1, 0.5]",
        "weight regularizer on rank 1 only": "weight_regularizer: "
        "[None, 'ClassParallelZeroCentroidRegularizer']",
        "zero-centroid form": "weight_regularizer.form: ['mean', 'sum']",
        "embedding regularizer on rank 1 only": "embedding_regularizer: [None, 'LpRegularizer']",
        "sample-margin weight": "sample_margin_reg_weight: [0.1, 0.2]",
    }
    assert set(per_rank[0]) == set(expected)
    for case, fragment in expected.items():
        errors = [result[case] for result in per_rank]
        assert errors[0] == errors[1], case  # one error, the same on every rank
        assert errors[0].startswith("ValueError: the ranks' class-parallel losses differ"), case
        assert fragment in errors[0], (case, errors[0])


@pytest.mark.parametrize("case", ["lm", "arcface"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_single_process_on_the_same_inputs(worker_results, case, dtype):
    """The single-process loss widens half-precision embeddings to float32 before anything else;
    so must the class-parallel loss (normalising in half precision costs ~1e-3)."""
    per_rank = _results(worker_results, check_half_precision_matches_single_process)
    inputs, labels, W, backbone = _problem()
    if case == "lm":
        single = LargestMarginSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE, scale=SCALE)
    else:
        single = _gm_loss(GeneralizedMarginSoftmaxLoss, case)
    with torch.no_grad():
        single.W.copy_(W.float())
    half = backbone(inputs).detach().float().to(dtype).requires_grad_(True)
    loss = single(half, labels)
    loss.backward()
    embedding_grad = half.grad.float().numpy()
    for rank, result in enumerate(per_rank):
        got = result[case, str(dtype)]
        assert got["loss"] == pytest.approx(loss.item(), rel=2e-6)
        start, stop = shard_bounds(NUM_CLASSES, 2, rank)
        np.testing.assert_allclose(
            got["W_grad"], single.W.grad[:, start:stop].numpy(), rtol=1e-5, atol=1e-7
        )
        # world_size × the single-process gradient, rounded to the embeddings' dtype.
        np.testing.assert_allclose(
            got["embedding_grad"], 2 * _local_rows(embedding_grad, rank), rtol=1e-2, atol=1e-4
        )


def test_empty_batches_match_single_process(worker_results):
    """An empty batch on every rank is a zero classification loss (plus the weight
    regularization), like the single-process loss on an empty batch; one empty rank is fine."""
    per_rank = _results(worker_results, check_empty_batches)
    inputs, labels, W, backbone = _problem()
    for case, rows in (("every rank empty", slice(0, 0)), ("rank 1 empty", slice(None))):
        single = _regularized(
            LargestMarginSoftmaxLoss,
            _single_process_zero_centroid(),
            NUM_CLASSES,
            EMBEDDING_SIZE,
            scale=SCALE,
        ).double()
        with torch.no_grad():
            single.W.copy_(W)
        embeddings = backbone(inputs[rows]).detach().requires_grad_(True)
        loss = single(embeddings, labels[rows])
        loss.backward()
        for rank, result in enumerate(per_rank):
            got = result[case]
            assert np.isfinite(got["loss"])
            assert got["loss"] == pytest.approx(loss.item(), rel=1e-9), case
            start, stop = got["class_range"]
            np.testing.assert_allclose(
                got["W_grad"], single.W.grad[:, start:stop].numpy(), rtol=1e-9, atol=1e-12
            )
            if case == "rank 1 empty" and rank == 0:
                np.testing.assert_allclose(got["embedding_grad"], 2 * embeddings.grad.numpy())
            elif rank == 1 or case == "every rank empty":
                assert got["embedding_grad"].shape == (0, EMBEDDING_SIZE)
    single = _regularized(
        LargestMarginSoftmaxLoss,
        _single_process_zero_centroid(),
        NUM_CLASSES,
        EMBEDDING_SIZE,
        scale=SCALE,
    )
    with torch.no_grad():
        single.W.copy_(W.float())
    half_empty = single(torch.zeros(0, EMBEDDING_SIZE, dtype=torch.bfloat16), labels[:0])
    assert str(half_empty.dtype) == "torch.float32"
    for result in per_rank:
        assert result["every rank empty, bfloat16"] == (half_empty.item(), "torch.float32")
    # The classification part of the empty batch is exactly zero: only R_w remains.
    centroid = torch.nn.functional.normalize(W, dim=0).mean(dim=1).square().sum()
    assert per_rank[0]["every rank empty"]["loss"] == pytest.approx(
        CENTROID_WEIGHT * centroid.item(), rel=1e-12
    )


def test_class_sampling_keeps_every_batch_class(worker_results):
    """With 3 of 50 classes kept per rank and 2 of them in the batch, a draw that ignored the
    batch would drop a batch class in nearly every run: the kept classes must be the batch's
    plus one other, and the loss LM-Softmax over exactly the kept classes."""
    per_rank = _results(worker_results, check_class_sampling_priority)
    W, local_embeddings = _priority_problem()
    embeddings = torch.cat(local_embeddings)
    labels = torch.cat(PRIORITY_LABELS)
    cosines = torch.nn.functional.normalize(embeddings, dim=1) @ torch.nn.functional.normalize(
        W, dim=0
    )
    target = cosines.gather(1, labels[:, None])
    for run in range(len(PRIORITY_SEEDS)):
        kept = []
        for result in per_rank:
            start, stop = result[run]["class_range"]
            batch_classes = {label for label in labels.tolist() if start <= label < stop}
            assert len(batch_classes) == 2
            assert batch_classes <= set(result[run]["kept"]), (run, result[run]["kept"])
            assert len(result[run]["kept"]) == 3
            kept += result[run]["kept"]
        non_target = cosines[:, kept].masked_fill(labels[:, None] == torch.tensor(kept), -torch.inf)
        expected = (torch.logsumexp(SCALE * (non_target - target), dim=1) / SCALE).mean()
        for result in per_rank:
            assert result[run]["loss"] == pytest.approx(expected.item(), rel=1e-12)


def test_class_parallel_losses_record_their_settings_and_score_w_itself_at_full_rate(
    worker_results,
):
    per_rank = _results(worker_results, check_recorded_settings)
    for rank, (recorded, class_range, untouched) in enumerate(per_rank):
        assert {"num_classes", "scale", "sample_rate"} <= set(recorded)
        assert class_range == shard_bounds(NUM_CLASSES, len(per_rank), rank)
        assert untouched


def _subgroup_problem():
    generator = torch.Generator().manual_seed(21)
    embeddings = torch.randn(sum(BATCH_SIZES), EMBEDDING_SIZE, generator=generator).double()
    labels = torch.randint(0, NUM_CLASSES, (sum(BATCH_SIZES),), generator=generator)
    W = torch.randn(EMBEDDING_SIZE, NUM_CLASSES, generator=generator).double()
    return embeddings, labels, W


def check_subgroup_of_a_larger_world(rank, world_size):
    # Ranks 0 and 1 of a 3-rank world train in their own process group; every collective of the
    # loss must use that group (with the default group rank 2 would be waited for).
    group = dist.new_group([0, 1])
    if rank == 2:
        return None
    embeddings, labels, W = _subgroup_problem()
    for memory in ("buffer", "stream"):
        loss_fn = ClassParallelLargestMarginSoftmaxLoss(
            NUM_CLASSES, EMBEDDING_SIZE, scale=SCALE, process_group=group, memory=memory
        ).double()
        loss_fn.load_full_W(W)
        local = _local_rows(embeddings, rank).clone().requires_grad_(True)
        loss = loss_fn(local, _local_rows(labels, rank))
        loss.backward()
        results = (loss.item(), local.grad.numpy().copy(), loss_fn.W.grad.numpy().copy())
        if memory == "buffer":
            buffered = results
    return buffered, results, loss_fn.class_range


def test_a_process_group_smaller_than_the_world():
    per_rank = run_in_workers([check_subgroup_of_a_larger_world], world_size=3)
    embeddings, labels, W = _subgroup_problem()
    single = LargestMarginSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE, scale=SCALE).double()
    with torch.no_grad():
        single.W.copy_(W)
    embeddings.requires_grad_(True)
    loss = single(embeddings, labels)
    loss.backward()
    for rank in (0, 1):
        result = per_rank[rank]["check_subgroup_of_a_larger_world"]
        if isinstance(result, Exception):
            raise result
        *by_path, (start, stop) = result
        for value, embedding_grad, weight_grad in by_path:
            assert value == pytest.approx(loss.item(), rel=1e-12)
            # Each rank's rows carry the world size (2) times their single-process gradient.
            np.testing.assert_allclose(
                embedding_grad, 2 * _local_rows(embeddings.grad, rank).numpy(), rtol=1e-10
            )
            np.testing.assert_allclose(
                weight_grad, single.W.grad[:, start:stop].numpy(), rtol=1e-10
            )
    assert per_rank[2]["check_subgroup_of_a_larger_world"] is None
