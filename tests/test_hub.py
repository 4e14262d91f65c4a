"""Contract tests of hfqat's Hub publishing calls against a local fake of the Hub endpoints.

`tests/hub_server.py` is a small HTTP server on 127.0.0.1 that speaks the routes and payloads huggingface_hub's
`HfApi.create_repo` + `upload_folder` use (create-repo / tree / validate-yaml / preupload / commit). These
tests run the real upload code path (`hfqat.hub.card` -> huggingface_hub -> HTTP) against it: they check what we
send and how we handle its answers (401 / 5xx, retry, token hygiene). They do not prove that huggingface.co
accepts the upload: the fake answers "regular" upload mode for every file, so the LFS/xet transfer that the
real Hub uses for weights is not exercised, and it does not check the card's metadata the way the Hub does.
"""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
import yaml
from hub_server import FakeHub, FakeRepo
from transformers import AutoModelForCausalLM

import hfqat
from hfqat.hub.card import write_model_card
from hfqat.hub.push import HubUploadError, push_packed_dir, push_to_hub
from hfqat.quant.modeling import qat_layers

TOKEN = "hf_hfqatTestToken_7f3a9c2e_DoNotLeak"
REPO = "someone/tiny-qat"


@pytest.fixture(scope="module")
def qat_model(tiny_model_dir):
    """Tiny llama, 4-bit g32 with a mixed allocation (every third layer at 2 bits, one at 8)."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir("llama"), quantization_config=hfqat.QATConfig(bits=4, group_size=32)
    )
    for i, (_, layer) in enumerate(qat_layers(model)):
        if i % 3 == 0:
            layer.set_bits(2)
    next(layer for i, (_, layer) in enumerate(qat_layers(model)) if i == 1).set_bits(8)
    return model.eval()


@pytest.fixture(scope="module")
def plot_png(tmp_path_factory):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = tmp_path_factory.mktemp("plots") / "bit_allocation.png"
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.imshow([[2, 4], [8, 4]])
    fig.savefig(path)
    plt.close(fig)
    return path


@pytest.fixture
def hub():
    with FakeHub(token=TOKEN, max_requests=100, lifetime_s=60) as server:
        yield server


METRICS = {"FP": {"ppl": 11.25, "size_mb": 1.7}, "PTQ (RTN)": {"ppl": 19.5}, "QAT": {"ppl": 12.0, "size_mb": 0.45}}


def _front_matter(readme: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", readme, re.S)
    assert match, "README.md has no YAML front matter"
    return yaml.safe_load(match[1])


def _table_bits(readme: str) -> dict[str, int]:
    """layer -> bits from the card's per-layer table rows ``| `name` | bits | group | weights |``."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^\| `([^`]+)` \| (\d+) \|", readme, re.M)}


def _materialize(repo: FakeRepo, path):
    for name, data in repo.files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def test_push_uploads_packed_weights_and_card(qat_model, plot_png, hub, tmp_path):
    local = tmp_path / "export"
    url = push_to_hub(
        qat_model, REPO, token=TOKEN, metrics=METRICS, endpoint=hub.url, plots=[plot_png],
        training_args={"learning_rate": 2e-4, "distill_weight": 0.5, "temperature": 2.0},
        reproduce_command=["hfqat", "train", "--recipe", "w4-mixed"], base_model="HuggingFaceTB/SmolLM2-135M",
        local_dir=local,
    )
    assert url == f"{hub.url}/{REPO}"
    assert None not in hub.routes_called(), f"unexpected routes: {hub.log}"
    files = hub.repos[REPO].files
    weights = [name for name in files if name.endswith(".safetensors")]
    assert weights and not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    for name in ("README.md", "config.json", "plots/bit_allocation.png", *weights):
        assert files[name] == (local / name).read_bytes(), f"{name} differs from the local export"
    assert files["plots/bit_allocation.png"] == plot_png.read_bytes()

    allocation = hfqat.bit_allocation(qat_model)
    packed = json.loads(files["config.json"])["quantization_config"]["packed_layers"]
    assert {name: entry["bits"] for name, entry in packed.items()} == allocation

    readme = files["README.md"].decode()
    meta = _front_matter(readme)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M" and meta["library_name"] == "transformers"
    assert {"hfqat", "quantization", "qat", "2-bit", "4-bit", "8-bit", "mixed-precision"} <= set(meta["tags"])
    assert _table_bits(readme) == allocation
    assert "](plots/bit_allocation.png)" in readme
    assert "import hfqat" in readme and f'from_pretrained("{REPO}")' in readme
    assert re.search(r"^\| PTQ \(RTN\) \| 19\.5 \| – \|$", readme, re.M)
    assert "| distill_weight | 0.5 |" in readme
    assert "hfqat train --recipe w4-mixed" in readme

    # What was uploaded is a loadable model with the fake-quant model's logits.
    reloaded = AutoModelForCausalLM.from_pretrained(_materialize(hub.repos[REPO], tmp_path / "download")).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, qat_model(ids).logits, atol=1e-4, rtol=0)
    # ...and a card written from the packed (reloaded) model shows the same bit map and weight counts.
    card = write_model_card(reloaded, tmp_path / "card-from-packed").read_text()
    assert _table_bits(card) == allocation and _table_bits(readme) == allocation
    assert re.findall(r"^\| `.*$", card, re.M) == re.findall(r"^\| `.*$", readme, re.M)


def test_hf_endpoint_env_private_and_temp_export_cleanup(qat_model, hub, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # set after huggingface_hub was imported: read at call time
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the default export folder goes
    url = push_to_hub(qat_model, REPO, token=TOKEN, private=True)
    assert url == f"{hub.url}/{REPO}"
    assert hub.repos[REPO].private
    assert "config.json" in hub.repos[REPO].files
    assert not list(tmp_path.glob("hfqat-push-*")), "the default temporary export must be removed after upload"


def test_repush_replaces_stale_weights_and_keeps_other_files(qat_model, hub, tmp_path):
    hub.repos[REPO] = FakeRepo(private=False, files={
        "model-00001-of-00002.safetensors": b"old", "model.safetensors.index.json": b"{}", "notes.txt": b"keep"})
    push_to_hub(qat_model, REPO, token=TOKEN, endpoint=hub.url, local_dir=tmp_path / "export")
    files = hub.repos[REPO].files
    assert "model-00001-of-00002.safetensors" not in files and "model.safetensors.index.json" not in files
    assert files["notes.txt"] == b"keep" and any(name.endswith(".safetensors") for name in files)


@pytest.mark.parametrize("status, route", [(500, "create"), (503, "create"), (403, "commit"), (401, None)])
def test_failure_keeps_export_and_retry_succeeds(qat_model, hub, tmp_path, status, route):
    local = tmp_path / "export"
    if status == 401:  # a wrong token: every request is refused
        with pytest.raises(HubUploadError) as info:
            push_to_hub(qat_model, REPO, token="hf_wrong_token", endpoint=hub.url, local_dir=local)
    else:
        hub.fail_next(1, status, route)
        with pytest.raises(HubUploadError) as info:
            push_to_hub(qat_model, REPO, token=TOKEN, endpoint=hub.url, local_dir=local)
    err = info.value
    assert isinstance(err, RuntimeError) and err.status_code == status and err.local_dir == local
    assert f"HTTP {status}" in str(err) and str(local) in str(err)
    assert not hub.repos.get(REPO, FakeRepo(private=False)).files, "nothing may be committed by a failed upload"
    exported = sorted(p.name for p in local.iterdir())
    assert "config.json" in exported and "README.md" in exported and any(n.endswith(".safetensors") for n in exported)

    url = push_packed_dir(err.local_dir, REPO, token=TOKEN, endpoint=hub.url)  # the retry the error suggests
    assert url == f"{hub.url}/{REPO}"
    assert hub.repos[REPO].files["config.json"] == (local / "config.json").read_bytes()


def test_unreachable_endpoint_keeps_default_export(qat_model, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with FakeHub(token=TOKEN) as server:
        dead = server.url  # closed on exit: nothing listens there any more
    with pytest.raises(HubUploadError, match="could not be reached") as info:
        push_to_hub(qat_model, REPO, token=TOKEN, endpoint=dead)
    err = info.value
    assert err.status_code is None and str(err.local_dir) in str(err)
    assert err.local_dir.parent.name.startswith("hfqat-push-") and (err.local_dir / "config.json").is_file()


def test_token_never_leaks(qat_model, plot_png, hub, tmp_path, caplog, capfd):
    for name in ("", "hfqat", "huggingface_hub", "httpx2", "httpcore2", "httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name or None)
    risky = dict(
        training_args={"learning_rate": 1e-4, "hub_token": TOKEN, "note": f"pushed with {TOKEN}"},
        reproduce_command=["hfqat", "push", "--token", TOKEN],
    )
    hub.fail_next(1, 500, "create")
    with pytest.raises(HubUploadError) as info:
        push_to_hub(qat_model, REPO, token=TOKEN, endpoint=hub.url, local_dir=tmp_path / "a", plots=[plot_png], **risky)
    push_to_hub(qat_model, REPO, token=TOKEN, endpoint=hub.url, local_dir=tmp_path / "b", **risky)

    assert TOKEN not in str(info.value) and TOKEN not in repr(info.value.args)
    names = {record.name.split(".")[0] for record in caplog.records}
    assert {"hfqat", "huggingface_hub", "httpx2"} <= names, f"debug logs of the HTTP stack were not captured: {names}"
    assert TOKEN not in caplog.text
    captured = capfd.readouterr()
    assert TOKEN not in captured.out and TOKEN not in captured.err
    for folder in (tmp_path / "a", tmp_path / "b"):
        for path in folder.rglob("*"):
            assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), f"token written to {path}"
    for name, data in hub.repos[REPO].files.items():
        assert TOKEN.encode() not in data, f"token uploaded in {name}"
    readme = hub.repos[REPO].files["README.md"].decode()
    assert "hub_token" not in readme and "hfqat push --token ***" in readme


def test_write_model_card_locally(qat_model, tmp_path):
    from transformers import TrainingArguments

    from hfqat.train.callback import QATCallback

    args = TrainingArguments(output_dir=str(tmp_path / "run"), learning_rate=3e-4, max_steps=7, hub_token=TOKEN,
                             report_to=[])
    callback = QATCallback(teacher=qat_model, distill_weight=0.7, temperature=3.0, bit_choices=(2, 4, 8))
    path = write_model_card(qat_model, tmp_path / "card", training_args=[args, callback])
    readme = path.read_text()
    meta = _front_matter(readme)
    assert "hfqat" in meta["tags"] and "base_model" not in meta  # a local float checkpoint is no Hub base model
    assert _table_bits(readme) == hfqat.bit_allocation(qat_model)
    assert "| learning_rate | 0.0003 |" in readme and "| max_steps | 7 |" in readme
    assert "output_dir" not in readme and TOKEN not in readme  # curated TrainingArguments subset only
    assert "| distill_weight | 0.7 |" in readme and "| temperature | 3 |" in readme
    assert "| bit_choices | 2, 4, 8 |" in readme and f"| teacher | `{type(qat_model).__name__}` |" in readme
    assert "history" not in readme
    assert "## Evaluation" not in readme and "## Reproduce" not in readme  # sections without data are left out


def test_card_from_existing_export_and_input_checks(qat_model, hub, tmp_path):
    from hfqat.export.packed import save_packed

    export = tmp_path / "export"
    save_packed(qat_model, export)
    (export / "README.md").unlink(missing_ok=True)
    push_packed_dir(export, REPO, token=TOKEN, endpoint=hub.url)  # writes the card from config.json
    card = hub.repos[REPO].files["README.md"].decode()
    assert _table_bits(card) == hfqat.bit_allocation(qat_model)
    # weighted by each layer's size, recorded in config.json (no model at hand)
    assert _front_matter(card)["hfqat"]["average_bits"] == pytest.approx(hfqat.average_bits(qat_model), abs=1e-3)

    with pytest.raises(ValueError, match="not an hfqat export"):
        push_packed_dir(tmp_path, REPO, token=TOKEN, endpoint=hub.url)
    with pytest.raises(ValueError, match="no quantized layer"):
        write_model_card(None, tmp_path / "empty")
    with pytest.raises(ValueError, match="metrics="):
        push_to_hub(qat_model, REPO, token=TOKEN, endpoint=hub.url, metrics={"QAT": 12.0}, local_dir=tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        push_to_hub(qat_model, REPO, token=TOKEN, endpoint=hub.url, plots=[tmp_path / "missing.png"],
                    local_dir=tmp_path / "y")
    (export / "inside.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match="inside local_dir"):
        push_to_hub(qat_model, REPO, token=TOKEN, endpoint=hub.url, plots=[export / "inside.png"], local_dir=export)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists(), "bad inputs must fail before packing"


def test_legacy_commit_path_without_xet(qat_model, hub, tmp_path, monkeypatch):
    """huggingface_hub without hf_xet commits through `create_commit`: same routes, one commit."""
    import huggingface_hub.hf_api

    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)
    push_to_hub(qat_model, REPO, token=TOKEN, endpoint=hub.url, local_dir=tmp_path / "export")
    assert {"README.md", "config.json"} <= set(hub.repos[REPO].files)
    assert hub.routes_called().count("commit") == 1 and None not in hub.routes_called()
