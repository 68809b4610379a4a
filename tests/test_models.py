import pytest
import torch

from fedkd.errors import ConfigError
from fedkd.models import count_parameters, create_model, list_models


def test_registry_lists_the_zoo():
    assert {"cnn_small", "cnn", "mlp", "resnet8", "resnet20"} <= set(list_models())


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 12, 12)])
def test_every_model_runs_on_every_input_shape(name, shape):
    if name == "lenet5" and shape[1] < 16:  # two unpadded 5x5 convs and pools
        with pytest.raises(ConfigError, match="at least 16x16"):
            create_model(name, num_classes=7, input_shape=shape)
        return
    model = create_model(name, num_classes=7, input_shape=shape)
    assert model(torch.zeros(2, *shape)).shape == (2, 7)


def test_seeded_creation_is_deterministic():
    a = create_model("cnn_small", num_classes=10, input_shape=(1, 28, 28), seed=(0, 1, "x"))
    b = create_model("cnn_small", num_classes=10, input_shape=(1, 28, 28), seed=(0, 1, "x"))
    c = create_model("cnn_small", num_classes=10, input_shape=(1, 28, 28), seed=(0, 2, "x"))
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka
    assert not all(
        torch.equal(va, vc)
        for va, vc in zip(a.state_dict().values(), c.state_dict().values(), strict=True)
    )


def test_seeded_creation_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    create_model("mlp", num_classes=10, input_shape=(1, 8, 8), seed=(5,))
    assert torch.equal(torch.rand(1), expected)


def test_default_student_is_about_100k_parameters_and_teacher_larger():
    student = create_model("cnn_small", num_classes=10, input_shape=(1, 28, 28))
    teacher = create_model("cnn", num_classes=10, input_shape=(1, 28, 28))
    assert 90_000 < count_parameters(student) < 120_000
    assert count_parameters(teacher) > 3 * count_parameters(student)


def test_lenet5_is_the_reference_cnn():
    # conv 1->6 (5x5), conv 6->16 (5x5), fc 256-120-84-10: 156 + 2,416 + 30,840 + 10,164 + 850
    assert (
        count_parameters(create_model("lenet5", num_classes=10, input_shape=(1, 28, 28))) == 44_426
    )


def test_width_kwarg_and_unknown_name():
    wide = create_model("resnet8", num_classes=10, input_shape=(3, 32, 32), width=32)
    assert count_parameters(wide) > 3 * count_parameters(
        create_model("resnet8", num_classes=10, input_shape=(3, 32, 32))
    )
    with pytest.raises(ConfigError, match=r"model\.student='vgg99' .*one of .*cnn_small"):
        create_model("vgg99", num_classes=10, input_shape=(1, 28, 28))
