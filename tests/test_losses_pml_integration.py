import pytest
import torch
from loss_utils import unreduced_losses
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners, reducers, regularizers, trainers
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_largest_margin.losses import GeneralizedMarginSoftmaxLoss, LargestMarginSoftmaxLoss

NUM_CLASSES, DIM = 6, 5
LOSSES = {
    "lm": lambda **kw: LargestMarginSoftmaxLoss(NUM_CLASSES, DIM, scale=8.0, **kw),
    "gm": lambda **kw: GeneralizedMarginSoftmaxLoss.preset(
        "arcface", NUM_CLASSES, DIM, scale=8.0, **kw
    ),
}


def batch(size=18, seed=0):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(size, DIM, generator=generator)
    return embeddings, torch.randint(0, NUM_CLASSES, (size,), generator=generator)


@pytest.fixture(params=sorted(LOSSES))
def make_loss(request):
    def make(**kwargs):
        torch.manual_seed(0)
        return LOSSES[request.param](**kwargs)

    return make


def test_reducers(make_loss):
    embeddings, labels = batch()
    losses = unreduced_losses(make_loss(), embeddings, labels)
    class_weights = torch.linspace(0.5, 2.0, NUM_CLASSES)
    low = losses.median().item()
    cases = [
        (reducers.MeanReducer(), losses.mean()),
        (reducers.SumReducer(), losses.sum()),
        (reducers.ThresholdReducer(low=low), losses[losses > low].mean()),
        (reducers.ClassWeightedReducer(class_weights), (losses * class_weights[labels]).mean()),
    ]
    for reducer, expected in cases:
        value = make_loss(reducer=reducer)(embeddings, labels)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)


def test_miner_indices_tuple_weights_the_samples(make_loss):
    embeddings, labels = batch()
    indices_tuple = miners.BatchHardMiner()(embeddings, labels)
    weights = lmu.convert_to_weights(indices_tuple, labels, dtype=torch.float32)
    assert not bool((weights == 1).all())
    losses = unreduced_losses(make_loss(), embeddings, labels)
    value = make_loss()(embeddings, labels, indices_tuple)
    torch.testing.assert_close(value, (losses * weights).mean())


def test_weight_and_embedding_regularizers(make_loss):
    embeddings, labels = batch()
    plain = make_loss()(embeddings, labels)
    loss_fn = make_loss(
        weight_regularizer=regularizers.RegularFaceRegularizer(),
        weight_reg_weight=0.5,
        embedding_regularizer=regularizers.LpRegularizer(),
        embedding_reg_weight=0.1,
    )
    assert loss_fn.sub_loss_names() == ["loss", "weight_reg_loss", "embedding_reg_loss"]
    expected = (
        plain
        + 0.5 * regularizers.RegularFaceRegularizer()(loss_fn.W.t())
        + 0.1 * regularizers.LpRegularizer()(embeddings)
    )
    torch.testing.assert_close(loss_fn(embeddings, labels), expected)


def test_multiple_losses(make_loss):
    embeddings, labels = batch()
    ours = make_loss()
    arcface = pml_losses.ArcFaceLoss(NUM_CLASSES, DIM)
    combined = pml_losses.MultipleLosses([ours, arcface], weights=[0.3, 0.7])
    expected = 0.3 * ours(embeddings, labels) + 0.7 * arcface(embeddings, labels)
    torch.testing.assert_close(combined(embeddings, labels), expected)


class _TinyDataset(torch.utils.data.Dataset):
    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.labels = torch.arange(48) % NUM_CLASSES
        self.data = torch.randn(48, 4, generator=generator) + self.labels[:, None].float()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.data[index], self.labels[index]


def test_pml_trainer_runs_a_few_iterations(make_loss, tmp_path):
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, DIM)
    loss_fn = make_loss()
    initial_W = loss_fn.W.detach().clone()
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": torch.nn.Identity()},
        optimizers={
            "trunk_optimizer": torch.optim.SGD(trunk.parameters(), lr=0.1),
            "metric_loss_optimizer": torch.optim.SGD(loss_fn.parameters(), lr=0.1),
        },
        batch_size=16,
        loss_funcs={"metric_loss": loss_fn},
        dataset=_TinyDataset(),
        iterations_per_epoch=3,
        dataloader_num_workers=0,
    )
    trainer.train(num_epochs=1)
    assert torch.isfinite(torch.as_tensor(trainer.losses["metric_loss"]))
    assert not torch.equal(loss_fn.W.detach(), initial_W)


def test_prototypes_are_a_parameter_initialised_like_pml(make_loss):
    torch.manual_seed(0)
    arcface = pml_losses.ArcFaceLoss(NUM_CLASSES, DIM)
    ours = make_loss()  # seeds 0 too
    assert isinstance(ours.W, torch.nn.Parameter) and ours.W.shape == (DIM, NUM_CLASSES)
    torch.testing.assert_close(ours.W, arcface.W, rtol=0, atol=0)  # PML's default init
    custom = make_loss(weight_init_func=lambda weights: torch.nn.init.constant_(weights, 0.5))
    assert bool((custom.W == 0.5).all())
