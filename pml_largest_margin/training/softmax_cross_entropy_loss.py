"""Plain softmax cross-entropy on a linear classifier, in PML's layout so its margins can be measured."""

from __future__ import annotations

import torch

from .._pml import BaseMetricLossFunction, WeightRegularizerMixin, c_f, lmu
from ..validation import check_integer


class SoftmaxCrossEntropyLoss(WeightRegularizerMixin, BaseMetricLossFunction):
    """``CE(z @ W, y)`` with prototypes ``W`` of shape (embedding_size, num_classes), no bias.

    Nothing is normalised: this is the unnormalised baseline the cosine losses are compared with.
    There is no bias so that the decision rule depends on the prototypes alone, whose class
    margin is then what ``margins.class_margin(W)`` measures.
    """

    def __init__(self, num_classes: int, embedding_size: int, **kwargs):
        # The sizes are checked as every loss of the library checks them.
        num_classes = check_integer(num_classes, "num_classes", at_least=2)
        embedding_size = check_integer(embedding_size, "embedding_size", at_least=1)
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.W = torch.nn.Parameter(torch.empty(embedding_size, num_classes))
        self.weight_init_func(self.W)
        self.add_to_recordable_attributes(
            list_of_names=["embedding_size", "num_classes"], is_stat=False
        )

    def get_default_weight_init_func(self) -> c_f.TorchInitWrapper:
        return c_f.TorchInitWrapper(torch.nn.init.xavier_uniform_)

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple | None,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> dict:
        c_f.labels_required(labels)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=embeddings.dtype)
        losses = torch.nn.functional.cross_entropy(
            self.get_logits(embeddings), labels, reduction="none"
        )
        loss_dict = {
            "loss": {
                "losses": losses * miner_weights,
                "indices": c_f.torch_arange_from_size(embeddings),
                "reduction_type": "element",
            }
        }
        self.add_weight_regularization_to_loss_dict(loss_dict, self.W.t())
        return loss_dict

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings @ self.W.to(embeddings.dtype)
