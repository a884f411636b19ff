"""PML plumbing shared by the margin-softmax losses: prototypes, checks, dtypes, reducers, stats."""

from __future__ import annotations

import torch

from .._pml import BaseMetricLossFunction, CosineSimilarity, WeightRegularizerMixin, c_f, lmu
from ..margins import class_margin, cosine_logits, max_over_sub_centers
from ..regularizers.sample_margin_regularizer_mixin import SampleMarginRegularizerMixin
from ..validation import (
    NORM_EPS,
    check_embeddings,
    check_flag,
    check_integer,
    check_labels,
    check_loss_arguments,
)
from ._sub_centers import sub_center_statistics
from .fused import DEFAULT_MEMORY, check_memory_mode, fused_nontarget_logsumexp

#: Default ``scale`` of GM-Softmax and the margin heads (the presets' s = 64, docs/losses.md).
DEFAULT_SCALE = 64.0
#: Default ``scale`` of LM-Softmax, whose logits have no margin term.
DEFAULT_LM_SOFTMAX_SCALE = 32.0

_HALF_DTYPES = (torch.float16, torch.bfloat16)


class BaseMarginSoftmaxLoss(
    SampleMarginRegularizerMixin, WeightRegularizerMixin, BaseMetricLossFunction
):
    """A classification loss that owns its prototypes ``W`` (embedding_size, num_classes).

    Subclasses implement :meth:`per_sample_losses`. This class follows PML's ``ArcFaceLoss``:
    ``W`` is initialised by ``weight_init_func``, handed to ``weight_regularizer`` as ``W.t()``,
    a miner's ``indices_tuple`` becomes per-sample weights (``lmu.convert_to_weights``), and the
    per-sample losses go to the reducer with ``reduction_type="element"``.

    ``sample_margin_regularizer=SampleMarginRegularizer(...)`` and ``sample_margin_reg_weight=λ``
    add ``λ·R_sm`` as the sub-loss ``sample_margin_loss`` (see
    :class:`~pml_largest_margin.regularizers.SampleMarginRegularizerMixin`), from the sample
    margins that :meth:`per_sample_losses` computes alongside the losses: no second matrix
    product and no second batch × classes buffer. The regularizer's reducer, the miner weights
    and its stats apply as for PML's losses.

    Unlike PML, ``W`` keeps its dtype: half-precision embeddings and autocast are computed in
    float32 (autocast disabled inside the loss), and the loss comes back in float32; float64
    embeddings are computed in float64. ``W`` is moved to the embeddings' device if needed.

    A zero embedding or prototype column has cosine 0 with everything, in the loss, ``get_logits``
    and the stats alike (norms clamped as in :mod:`pml_largest_margin.margins`).

    Args:
        num_classes, embedding_size, scale: checked by
            :func:`~pml_largest_margin.validation.check_loss_arguments` (integers >= 2 and >= 1, a
            finite number > 0; numpy and 0-d torch scalars accepted, bools refused).
        validate_inputs: check embeddings for NaN/Inf (a ValueError). The check reads the
            embeddings once; turn it off in hot loops whose inputs are known to be finite.
            Labels are always checked (a torch integer tensor, in range).
        record_class_margin: with ``collect_stats``, also record ``class_margin_degrees``, the
            class margin of ``W`` (:func:`~pml_largest_margin.margins.class_margin`). It costs
            O(C²d) per call (about 6 s at C = 100k, d = 128 on 2 CPU cores), so turn it off, or
            collect stats only now and then, for many classes. The batch's
            ``mean_sample_margin`` and ``min_sample_margin`` are always recorded.
        memory: ``"buffer"`` (one batch × classes buffer), ``"stream"`` (W visited in blocks
            of columns, no batch × classes tensor, one more matrix product) or ``"auto"``
            (stream when the buffer would exceed
            :data:`~pml_largest_margin.losses.fused.BUFFER_LIMIT_BYTES`); the same values and
            gradients either way (docs/losses.md, "Memory").
        record_target_cosines: keep the batch's target cosines ``cos θ_{i,y_i}`` as
            ``target_cosines``, its labels as ``target_labels`` and its sample margins as
            ``batch_sample_margins``, detached (N,) tensors left on the device (not PML stats, and
            independent of ``collect_stats``), for
            :class:`~pml_largest_margin.margin_monitor.MarginMonitor`. The target cosines are
            the fused kernel's own ``t`` (:meth:`cosine_statistics`), or for a loss that does
            not run it, gathered from the N target columns of ``W``, O(N·d); the margins come
            detached from the forward pass: no further matrix product and no host copy.
        sub_centers: ``k >= 1`` prototypes per class, as in PML's ``SubCenterArcFaceLoss``: ``W``
            has shape (embedding_size, num_classes·k), class c owning the columns
            ``c·k … c·k + k − 1``, and a class's cosine is the largest of its sub-centres'
            (docs/theory.md §7.8). Only losses with ``supports_sub_centers`` take ``k > 1``.

    Capabilities (class attributes, refused with a ValueError at construction when absent):
    ``supports_stream`` (``memory="stream"`` honoured), ``supports_sample_margin_regularizer``
    (the kernel's sample margins carry their gradient) and ``supports_sub_centers``.
    """

    supports_stream = True
    supports_sample_margin_regularizer = True
    supports_sub_centers = False

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float,
        validate_inputs: bool = True,
        record_class_margin: bool = True,
        memory: str = DEFAULT_MEMORY,
        record_target_cosines: bool = False,
        sub_centers: int = 1,
        **kwargs,
    ):
        num_classes, embedding_size, scale = check_loss_arguments(
            num_classes, embedding_size, scale
        )
        validate_inputs = check_flag(validate_inputs, "validate_inputs")
        record_class_margin = check_flag(record_class_margin, "record_class_margin")
        sub_centers = check_integer(sub_centers, "sub_centers", at_least=1)
        self._check_capabilities(memory, kwargs.get("sample_margin_regularizer"), sub_centers)
        super().__init__(**kwargs)
        self.memory = check_memory_mode(memory)
        c_f.assert_distance_type(self, CosineSimilarity)
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.scale = scale
        self.validate_inputs = validate_inputs
        self.record_class_margin = record_class_margin
        self.record_target_cosines = bool(record_target_cosines)
        self.target_cosines = self.target_labels = self.batch_sample_margins = None
        self.sub_centers = sub_centers
        self.W = torch.nn.Parameter(
            torch.empty(self.embedding_size, self.num_classes * self.sub_centers)
        )
        self.weight_init_func(self.W)
        self.add_to_recordable_attributes(
            list_of_names=["num_classes", "embedding_size", "scale", "sub_centers"], is_stat=False
        )
        self.add_to_recordable_attributes(
            list_of_names=["mean_sample_margin", "min_sample_margin"], is_stat=True
        )
        if self.record_class_margin:
            self.add_to_recordable_attributes(name="class_margin_degrees", is_stat=True)

    def _check_capabilities(self, memory, sample_margin_regularizer, sub_centers) -> None:
        """Refuse what this loss does not support, naming the argument (see the class docstring)."""
        name = type(self).__name__
        if memory == "stream" and not self.supports_stream:
            raise ValueError(f"{name} does not support memory='stream'; use 'buffer' or 'auto'")
        if sample_margin_regularizer is not None and not self.supports_sample_margin_regularizer:
            raise ValueError(f"{name} does not take a sample_margin_regularizer")
        if sub_centers > 1 and not self.supports_sub_centers:
            raise ValueError(f"{name} does not support sub_centers > 1")

    def per_sample_losses(
        self,
        embeddings: torch.Tensor,
        weights: torch.Tensor,
        labels: torch.Tensor,
        with_margins: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Losses (N,) of a non-empty batch, in the dtype of ``weights``, and the sample margins.

        The margins ``γ_i = cos_{i,y_i} − max_{j≠y_i} cos_ij`` (N,) are computed from the same
        cosines when ``with_margins`` is true; otherwise ``None``. They are differentiable when
        :attr:`margins_need_gradient`, else they may come detached (statistics only).
        """
        raise NotImplementedError

    @property
    def margins_need_gradient(self) -> bool:
        """Whether the sample margins feed a loss term (the sample-margin regularizer); if not,
        they are only recorded as stats and need no gradient."""
        return self.sample_margin_regularizer is not None

    def cosine_statistics(
        self,
        embeddings: torch.Tensor,
        weights: torch.Tensor,
        labels: torch.Tensor,
        scale: float,
        with_margins: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(u, t, γ or None)`` of the batch on this loss's ``memory`` path: the fused kernel
        (:func:`~pml_largest_margin.losses.fused.fused_nontarget_logsumexp`), or the sub-centre
        statistics when ``sub_centers > 1``.

        On the fused kernel, ``γ`` (only with ``with_margins``) is differentiable when
        :attr:`margins_need_gradient`; otherwise it is the same values taken from the forward
        pass without a gradient (no nearest-class bookkeeping, nothing added to backward), and
        with ``record_target_cosines`` the kernel's ``t`` is recorded as the target cosines.
        """
        if self.sub_centers > 1:
            return sub_center_statistics(
                embeddings, weights, labels, scale, self.sub_centers,
                with_margins=with_margins, memory=self.memory,
            )  # fmt: skip
        differentiable = with_margins and self.margins_need_gradient
        nontarget_lse, target, margins = fused_nontarget_logsumexp(
            embeddings,
            weights,
            labels,
            scale,
            with_margins=differentiable,
            detached_margins=with_margins and not differentiable,
            memory=self.memory,
        )
        if self.record_target_cosines:
            self.target_cosines, self.target_labels = target.detach(), labels.detach()
        return nontarget_lse, target, margins

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        indices_tuple: tuple | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """PML's ``forward`` on float32 copies of half-precision embeddings, inputs checked first.

        Embeddings and labels are checked before PML sees them (a list of labels is a TypeError
        here, not an AttributeError inside PML). PML's ``MultipleReducers`` (built as soon as a
        regularizer adds a sub-loss) sums the sub-losses in the embeddings' dtype, which would
        round the float32 loss to bfloat16; the cast is differentiable, so gradients still reach
        the caller in its own dtype.
        """
        c_f.labels_required(labels)
        self._check_inputs(embeddings, labels)
        if embeddings.dtype in _HALF_DTYPES:
            embeddings = embeddings.float()
        return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple | None,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> dict:
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        weights = self._compute_weights(embeddings)
        if embeddings.shape[0] == 0:
            # No samples: a zero on the graph of both inputs, so backward() gives zero gradients.
            zero = embeddings.sum().to(weights.dtype) * 0 + weights[:, :0].sum()
            loss = {"losses": zero, "indices": None, "reduction_type": "already_reduced"}
            loss_dict = {"loss": loss}
            if self.sample_margin_regularizer is not None:
                loss_dict["sample_margin_loss"] = dict(loss)
        else:
            with_margins = (
                self.collect_stats or self.record_target_cosines or self.margins_need_gradient
            )
            if self.record_target_cosines:
                # Recorded by cosine_statistics when the loss runs the fused kernel.
                self.target_cosines = self.target_labels = None
            with torch.autocast(device_type=embeddings.device.type, enabled=False):
                losses, margins = self.per_sample_losses(
                    embeddings.to(weights.dtype), weights, labels, with_margins
                )
            if self.collect_stats:
                self.record_sample_margins(margins.detach())
            if self.record_target_cosines:
                self.batch_sample_margins = margins.detach()
                if self.target_cosines is None:
                    self._record_target_cosines(embeddings, weights, labels)
            miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=losses.dtype)
            loss = {
                "losses": losses * miner_weights,
                "indices": c_f.torch_arange_from_size(embeddings),
                "reduction_type": "element",
            }
            loss_dict = {"loss": loss}
            self.add_sample_margin_regularization_to_loss_dict(
                loss_dict, embeddings, labels, indices_tuple, margins=margins
            )
        if self.collect_stats and self.record_class_margin:
            self.class_margin_degrees = class_margin(self.W, sub_centers=self.sub_centers).degrees
        self.add_weight_regularization_to_loss_dict(loss_dict, self.W.t())
        return loss_dict

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``s · cos θ_ij`` for inference (no margin), shape (N, num_classes), float32 or wider;
        with sub-centres a class's cosine is its best sub-centre's."""
        self._check_embeddings(embeddings)
        weights = self._compute_weights(embeddings)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cosines = cosine_logits(embeddings.to(weights.dtype), weights)
            return self.scale * max_over_sub_centers(cosines, self.sub_centers)

    def get_default_distance(self) -> CosineSimilarity:
        return CosineSimilarity()

    def record_sample_margins(self, margins: torch.Tensor) -> None:
        """Store the batch's mean and minimum sample margin as stats (``collect_stats=True``)."""
        if margins.numel():
            self.mean_sample_margin = float(margins.mean())
            self.min_sample_margin = float(margins.min())

    @torch.no_grad()
    def _record_target_cosines(self, embeddings, weights, labels) -> None:
        # For the losses that do not run the fused kernel (cosine_statistics records its t).
        # Row by row (N, d): half the tensor operations of normalising first, which the monitor
        # pays at every batch. The embedding norm is clamped as torch.nn.functional.normalize does.
        # With k sub-centres the k target columns are compared, (N, k, d), and the best one kept.
        k = self.sub_centers
        columns = labels.long()[:, None] * k + torch.arange(k, device=labels.device)
        targets = weights.detach().t()[columns]
        embeddings = embeddings.detach().to(targets.dtype)[:, None, :]
        norms = torch.linalg.vector_norm(embeddings, dim=2).clamp_min_(NORM_EPS)
        norms = norms * torch.linalg.vector_norm(targets, dim=2).clamp_min_(NORM_EPS)
        cosines = (embeddings * targets).sum(dim=2).div_(norms)
        self.target_cosines = cosines.amax(dim=1)
        self.target_labels = labels.detach()

    def _check_embeddings(self, embeddings):
        check_embeddings(embeddings, finite=self.validate_inputs)
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings have dimension {embeddings.shape[1]} but the loss was built with "
                f"embedding_size={self.embedding_size}"
            )

    def _check_inputs(self, embeddings, labels):
        self._check_embeddings(embeddings)
        check_labels(labels, self.num_classes, embeddings.shape[0])

    def _compute_weights(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``W`` on the embeddings' device, in the compute dtype (at least float32)."""
        if self.W.device != embeddings.device:
            self.W.data = self.W.data.to(embeddings.device)
        dtype = torch.promote_types(self.W.dtype, embeddings.dtype)
        if dtype in _HALF_DTYPES:
            dtype = torch.float32
        return self.W if self.W.dtype == dtype else self.W.to(dtype)
