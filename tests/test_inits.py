"""`--init` parsed once (`covidtl.inits.Init`): every form, the labels that name cells, one line for a bad value."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from covidtl.cells import cell_name
from covidtl.cli import main
from covidtl.errors import UserError
from covidtl.inits import Init, init_label, is_init

# text -> (source, finetune, file, label): the labels are those cells, file names and MLflow tags carried before.
FORMS = {
    "random": ("random", False, None, "random"),
    "imagenet": ("imagenet", False, None, "imagenet"),
    "finetune": ("imagenet", True, None, "finetune"),
    "pretrained": ("pretrained", False, None, "pretrained"),
    "finetune:pretrained": ("pretrained", True, None, "finetune-pretrained"),
    "weights/x.weights.h5": ("file", False, "weights/x.weights.h5", "file-x"),
    "finetune:weights/x.weights.h5": ("file", True, "weights/x.weights.h5", "finetune-file-x"),
    "/abs/dir/cnn.h5": ("file", False, "/abs/dir/cnn.h5", "file-cnn"),
    "rel.hdf5": ("file", False, "rel.hdf5", "file-rel"),
    "finetune:a/b/c.hdf5": ("file", True, "a/b/c.hdf5", "finetune-file-c"),
}


@pytest.mark.parametrize("text", FORMS)
def test_every_form_parses_once_into_what_it_says(text):
    init = Init.parse(text)
    assert (init.source, init.finetune, init.file, init.label) == FORMS[text]
    assert str(init) == init.text == text and Init.parse(str(init)) == init and Init.of(init) is init
    assert is_init(text)
    named = f"vgg16-{FORMS[text][3]}-ct-best"
    assert cell_name("vgg16", init, "ct", "best") == cell_name("vgg16", text, "ct", "best") == named


def test_pretrained_becomes_its_file_keeping_how_it_trains():
    assert Init.parse("pretrained").with_file("p/m.weights.h5") == Init.parse("p/m.weights.h5")
    assert Init.parse("finetune:pretrained").with_file("p/m.weights.h5") == Init.parse("finetune:p/m.weights.h5")


def test_a_recorded_label_names_its_cell_as_before():
    """What a record holds (a label, or `unknown` when it says nothing) names a cell as it did."""
    recorded = ("file-x", "finetune-file-x", "unknown")
    assert [init_label(text) for text in recorded] == ["file-x", "finetune-file-x", "file-unknown"]


@pytest.mark.parametrize("text", ["bogus", "finetune:imagenet", "finetune:random", "weights/x.keras", "file-x", ""])
def test_a_bad_value_is_one_line_naming_it_and_the_forms(text):
    assert not is_init(text)
    with pytest.raises(UserError) as caught:
        Init.parse(text)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"--init {text}: no such weights file; give random, imagenet")


@pytest.mark.parametrize("command", [["train", "--dataset", "ct"], ["cv", "--dataset", "ct"],
                                     ["tune", "--dataset", "ct"]])
def test_every_init_option_refuses_a_bad_value_in_one_line(command):
    result = CliRunner().invoke(main, [*command, "--init", "imagenett"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: --init imagenett: no such weights file; give random, imagenet, finetune or an existing file "
        "saved with model.save_weights(...)"]
