"""Image sinks with the real logger clients: each run's own files hold its pictures, at their steps.

W&B runs offline and MLflow on a file store under ``tmp_path``; pictures are read back from
what the clients wrote (event files, media files, artifacts) and compared pixel by pixel.
"""

from __future__ import annotations

import doctest
import glob
import io
import json
import os
import re
import struct
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CometLogger, CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from PIL import Image
from torch import Tensor

from sp_lightning.sinks import (
    CometSink,
    ImageSink,
    MlflowSink,
    PngSink,
    TensorBoardSink,
    WandbSink,
    base,
    image_sinks,
    png_path,
    run_directory,
)

# comet_ml's own shutdown code still calls a deprecated sentry_sdk API.
pytestmark = pytest.mark.filterwarnings("ignore:`sentry_sdk.Hub` is deprecated")

TAG = "semantic_pullback/probe_00"
OVERVIEW = "semantic_pullback/overview"


def picture(seed: int, height: int = 12, width: int = 20) -> Tensor:
    """A (3, H, W) image in [0, 1] that differs from seed to seed."""
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed))


def as_bytes(image: Tensor, rounded: bool = True) -> np.ndarray:
    """The (H, W, 3) uint8 pixels a lossless writer must store for ``image`` (TensorBoard truncates, not rounds)."""
    scaled = image * 255
    return (scaled.round() if rounded else scaled).to(torch.uint8).permute(1, 2, 0).numpy()


def assert_png_holds(data: bytes | str | Path, image: Tensor, rounded: bool = True) -> None:
    """The PNG (bytes or file) decodes to exactly ``image``'s pixels and size."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as png:
        assert png.format == "PNG"
        np.testing.assert_array_equal(np.asarray(png.convert("RGB")), as_bytes(image, rounded))


def trainer(logger: object, root: Path) -> pl.Trainer:
    return pl.Trainer(
        logger=logger, default_root_dir=root, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )


class Recorder(ImageSink):
    """A user's sink: remembers every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def log_images(self, images: Mapping[str, Tensor], step: int, caption: str) -> None:
        self.calls.append(("images", (sorted(images), step, caption)))

    def log_animation(self, tag: str, path: str, step: int) -> None:
        self.calls.append(("animation", (tag, path, step)))

    def close(self) -> None:
        self.calls.append(("close", None))


# --- W&B and MLflow: read back what the clients stored -------------------------------------------

@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], None]]:
    """W&B offline, with its config and cache inside ``tmp_path``; yields ``finish()``, which ends the run.

    ``finish()`` also stops W&B's service process: ``wandb.finish()`` alone can return before the
    service has written the run's last records to its ``.wandb`` file.
    """
    import wandb

    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "wb_config",
                        "WANDB_CACHE_DIR": tmp_path / "wb_cache", "WANDB_DATA_DIR": tmp_path / "wb_data"}.items():
        monkeypatch.setenv(name, str(value))

    def finish() -> None:
        wandb.finish()
        wandb.teardown()

    yield finish
    finish()


def wandb_history(run_dir: str) -> list[dict[str, object]]:
    """The history rows of an offline run, decoded from its ``.wandb`` file (LevelDB log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(os.path.join(run_dir, "*.wandb"))
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending, rows = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def wandb_images(logger: WandbLogger, tag: str) -> list[tuple[int, str, str]]:
    """(trainer step, caption, media file) of every picture the run logged under ``tag``."""
    run_dir = os.path.dirname(logger.experiment.dir)
    files = logger.experiment.dir
    return [(row["trainer/global_step"], row[f"{tag}/caption"], os.path.join(files, row[f"{tag}/path"]))
            for row in wandb_history(run_dir) if f"{tag}/path" in row]


@pytest.fixture
def file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A local MLflow tracking URI (MLflow 3 refuses a file store unless allowed)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return (tmp_path / "mlruns").as_uri()


def mlflow_images(logger: MLFlowLogger, tag: str) -> dict[int, str]:
    """step -> PNG file of every picture ``log_image`` stored under ``tag`` in the run's artifacts."""
    from sp_lightning.sinks.mlflow import local_artifact_dir

    folder = os.path.join(local_artifact_dir(logger), "images")
    key = tag.replace("/", "~")  # how MLflow spells a key in a file name
    found = {}
    for name in os.listdir(folder):
        match = re.fullmatch(re.escape(key) + r"\+step\+(\d+)\+.*(?<!\+compressed)\.png", name)
        if match:
            found[int(match.group(1))] = os.path.join(folder, name)
    return found


@pytest.fixture
def offline_comet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Comet offline: each experiment becomes a zip archive in the returned folder when it ends.

    (Lightning's ``CometLogger(online=False)`` makes a disabled experiment that records nothing;
    ``COMET_START_ONLINE=false`` makes a real offline one.)
    """
    monkeypatch.setenv("COMET_START_ONLINE", "false")
    monkeypatch.setenv("COMET_INI", str(tmp_path / "comet.ini"))
    return tmp_path / "comet"


def comet_images(logger: CometLogger, folder: Path, tag: str) -> dict[int, tuple[str, bytes]]:
    """step -> (caption, image file) of every picture the ended experiment logged under ``tag`` with a caption.

    (Comet's own TensorBoard auto-logging also copies a TensorBoardLogger's images, captionless.)
    """
    (archive,) = folder.glob(f"{logger.experiment.get_key()}-*.zip")
    with zipfile.ZipFile(archive) as stored:
        found = {}
        for line in stored.read("messages.json").decode().splitlines():
            payload = json.loads(line)["payload"]
            if (payload.get("upload_type") == "visualization" and payload["additional_params"]["figName"] == tag
                    and "caption" in payload["metadata"]):
                step = payload["additional_params"]["step"]
                found[step] = (payload["metadata"]["caption"], stored.read(payload["file_path"]))
        return found


# --- tests ----------------------------------------------------------------------------------------

def test_png_path_layout_and_bad_tags() -> None:
    expected = os.path.join("/runs/v0", "semantic_pullback", "probe_00", "step_00000120.png")
    assert png_path("/runs/v0", TAG, 120) == expected
    for bad in ("a//b", "../escape", "a/./b", "/absolute", "back\\slash"):
        with pytest.raises(ValueError, match="tag"):
            png_path("/runs", bad, 1)
    with pytest.raises(ValueError, match="step"):
        png_path("/runs", TAG, -1)


def test_a_picture_that_is_not_3_h_w_float_is_refused(tmp_path: Path) -> None:
    sink = PngSink(str(tmp_path))
    for bad in (torch.rand(12, 20), torch.rand(1, 12, 20), torch.zeros(3, 4, 4, dtype=torch.uint8)):
        with pytest.raises(ValueError, match=re.escape(repr(TAG))):
            sink.log_images({TAG: bad}, step=1, caption="")
    assert not any(tmp_path.iterdir())


def test_tensorboard_runs_keep_their_own_pictures_at_their_steps(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = []
    for run in range(2):
        logger = TensorBoardLogger(tmp_path, name="tb")
        (sink,) = image_sinks(trainer(logger, tmp_path))
        assert isinstance(sink, TensorBoardSink)
        for step in (3, 7):
            sink.log_images({TAG: picture(10 * run + step)}, step=step, caption=f"step {step}")
        sink.close()
        runs.append(logger.log_dir)
    assert runs[0] != runs[1]
    for run, log_dir in enumerate(runs):
        events = EventAccumulator(log_dir, size_guidance={"images": 0})
        events.Reload()
        stored = events.Images(TAG)
        assert [event.step for event in stored] == [3, 7]
        for event in stored:
            assert (event.width, event.height) == (20, 12)
            assert_png_holds(event.encoded_image_string, picture(10 * run + event.step), rounded=False)


def test_wandb_runs_keep_their_own_media_and_an_older_step_from_a_thread_is_kept(
    tmp_path: Path, offline_wandb: Callable[[], None]
) -> None:
    runs = []
    for run in range(2):
        logger = WandbLogger(save_dir=tmp_path / "wb", offline=True, project="sp")
        fit = trainer(logger, tmp_path)
        (sink,) = image_sinks(fit)
        assert isinstance(sink, WandbSink)
        assert run_directory(fit) == os.path.abspath(logger.experiment.dir)
        logger.log_metrics({"loss": 1.0}, step=10)  # the training loop is ahead of the picture being drawn
        images = {TAG: picture(run), OVERVIEW: picture(9)}
        drawing = threading.Thread(target=sink.log_images, args=(images, 5, "step 5"))
        drawing.start()
        drawing.join()
        timelapse = Path(logger.experiment.dir) / "timelapse.gif"
        Image.fromarray(as_bytes(picture(run))).save(timelapse)
        sink.log_animation(TAG, str(timelapse), step=5)
        sink.close()
        offline_wandb()
        runs.append((logger, timelapse.read_bytes()))

    assert runs[0][0].experiment.dir != runs[1][0].experiment.dir
    for run, (logger, animation) in enumerate(runs):
        stored = wandb_images(logger, TAG)
        assert [(step, caption) for step, caption, _ in stored] == [(5, "step 5")]
        media = stored[0][2]
        assert media.startswith(os.path.join(logger.experiment.dir, "media", "images", ""))
        assert_png_holds(media, picture(run))
        rows = wandb_history(os.path.dirname(logger.experiment.dir))
        (video,) = [row for row in rows if f"{TAG}_timelapse/path" in row]
        assert video["trainer/global_step"] == 5
        assert Path(logger.experiment.dir, video[f"{TAG}_timelapse/path"]).read_bytes() == animation


def test_mlflow_runs_keep_their_own_images_and_one_replaced_timelapse(tmp_path: Path, file_store: str) -> None:
    runs = []
    for run in range(2):
        logger = MLFlowLogger(experiment_name="sp", tracking_uri=file_store)
        (sink,) = image_sinks(trainer(logger, tmp_path))
        assert isinstance(sink, MlflowSink)
        for step in (2, 4):
            sink.log_images({TAG: picture(10 * run + step)}, step=step, caption="")
        timelapse = tmp_path / f"timelapse_{run}.gif"
        for frame in range(2):  # the callback rewrites the file after every log
            Image.fromarray(as_bytes(picture(frame))).save(timelapse)
            sink.log_animation(TAG, str(timelapse), step=frame)
        runs.append(logger)

    assert runs[0].run_id != runs[1].run_id
    from sp_lightning.sinks.mlflow import local_artifact_dir

    for run, logger in enumerate(runs):
        stored = mlflow_images(logger, TAG)
        assert sorted(stored) == [2, 4]
        for step, path in stored.items():
            assert_png_holds(path, picture(10 * run + step))
        kept = Path(local_artifact_dir(logger), *TAG.split("/"))
        assert [p.name for p in kept.iterdir()] == [f"timelapse_{run}.gif"]
        assert (kept / f"timelapse_{run}.gif").read_bytes() == (tmp_path / f"timelapse_{run}.gif").read_bytes()


def test_mlflow_timelapse_written_into_the_local_artifacts_is_left_in_place(tmp_path: Path, file_store: str) -> None:
    logger = MLFlowLogger(experiment_name="sp", tracking_uri=file_store)
    fit = trainer(logger, tmp_path)
    (sink,) = image_sinks(fit)
    directory = run_directory(fit)
    assert directory.endswith(os.path.join(logger.run_id, "artifacts"))
    timelapse = Path(directory, "timelapse.gif")
    Image.fromarray(as_bytes(picture(1))).save(timelapse)
    sink.log_animation(TAG, str(timelapse), step=1)
    assert [p.name for p in Path(directory).iterdir()] == ["timelapse.gif"]


def test_mlflow_client_without_keyed_log_image_gets_png_artifacts(tmp_path: Path, file_store: str) -> None:
    from mlflow.tracking import MlflowClient

    class OldClient(MlflowClient):
        """log_image as before MLflow 2.12: no key, no step."""

        def log_image(self, run_id: str, image: object, artifact_file: str) -> None:  # type: ignore[override]
            super().log_image(run_id, image, artifact_file=artifact_file)

    logger = MLFlowLogger(experiment_name="sp", tracking_uri=file_store)
    sink = MlflowSink(SimpleNamespace(experiment=OldClient(file_store), run_id=logger.run_id))
    sink.log_images({TAG: picture(3)}, step=8, caption="")
    from sp_lightning.sinks.mlflow import local_artifact_dir

    assert_png_holds(png_path(local_artifact_dir(logger), TAG, 8), picture(3))


def test_comet_runs_keep_their_own_images_at_their_steps(tmp_path: Path, offline_comet: Path) -> None:
    runs = []
    for run in range(2):
        logger = CometLogger(offline_directory=str(offline_comet), project="sp")
        fit = trainer(logger, tmp_path)
        (sink,) = image_sinks(fit)
        assert isinstance(sink, CometSink)
        for step in (1, 9):
            sink.log_images({TAG: picture(10 * run + step)}, step=step, caption=f"step {step}")
        logger.experiment.end()
        runs.append(logger)
    assert runs[0].experiment.get_key() != runs[1].experiment.get_key()
    for run, logger in enumerate(runs):
        stored = comet_images(logger, offline_comet, TAG)
        assert sorted(stored) == [1, 9]
        for step, (caption, data) in stored.items():
            assert caption == f"step {step}"
            assert_png_holds(data, picture(10 * run + step))


def test_csv_logger_runs_write_pngs_into_their_own_log_dir(tmp_path: Path) -> None:
    seen = []
    for run in range(2):
        logger = CSVLogger(tmp_path, name="csv")
        with pytest.warns(UserWarning, match=re.escape(os.path.abspath(logger.log_dir))) as caught:
            (sink,) = image_sinks(trainer(logger, tmp_path))
        assert "CSVLogger" in str(caught[0].message)
        assert isinstance(sink, PngSink) and sink.directory == os.path.abspath(logger.log_dir)
        sink.log_images({TAG: picture(run)}, step=40, caption="step 40")
        seen.append(sink.directory)
    assert seen[0] != seen[1]
    for run, directory in enumerate(seen):
        assert_png_holds(png_path(directory, TAG, 40), picture(run))


def test_no_logger_runs_write_pngs_into_fresh_per_run_dirs(tmp_path: Path) -> None:
    seen = []
    for run in range(2):
        fit = trainer(False, tmp_path)
        with pytest.warns(UserWarning, match="logger=False"):
            (sink,) = image_sinks(fit)
        assert isinstance(sink, PngSink)
        assert run_directory(fit) == sink.directory  # the time-lapse lands beside the PNGs
        sink.log_images({TAG: picture(run)}, step=2, caption="")
        seen.append(sink.directory)
    assert seen == [str(tmp_path / "semantic_pullback_logs" / f"version_{run}") for run in range(2)]
    for run, directory in enumerate(seen):
        assert_png_holds(png_path(directory, TAG, 2), picture(run))


class PlainLogger(Logger):
    """A third-party logger that keeps no pictures; ``save_dir=None`` means nothing local."""

    def __init__(self, save_dir: str | None, version: int) -> None:
        super().__init__()
        self._save_dir, self._version = save_dir, version

    name = "plain"
    save_dir = property(lambda self: self._save_dir)
    version = property(lambda self: self._version)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_hyperparams(self, params: object) -> None: ...


def test_other_loggers_get_pngs_in_their_lightning_style_run_dir_else_a_fresh_one(tmp_path: Path) -> None:
    fit = trainer([PlainLogger(str(tmp_path / "plain_logs"), 3), PlainLogger(None, 0)], tmp_path)
    with pytest.warns(UserWarning, match="PlainLogger, PlainLogger"):
        own, fresh = image_sinks(fit)
    assert own.directory == str(tmp_path / "plain_logs" / "plain" / "version_3")
    assert fresh.directory == str(tmp_path / "semantic_pullback_logs" / "version_0")
    assert run_directory(fit) == own.directory


def test_png_dir_takes_the_pngs_of_every_plain_logger(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    chosen = tmp_path / "chosen"
    fit = trainer([CSVLogger(tmp_path, name="a"), CSVLogger(tmp_path, name="b")], tmp_path)
    (sink,) = image_sinks(fit, png_dir=str(chosen))
    sink.log_images({TAG: picture(4)}, step=6, caption="")
    assert_png_holds(png_path(str(chosen), TAG, 6), picture(4))
    assert not [w for w in recwarn if "PNG" in str(w.message)]  # the user chose where they go


def test_several_loggers_each_get_the_pictures_and_the_timelapse(
    tmp_path: Path, offline_wandb: Callable[[], None], file_store: str, offline_comet: Path
) -> None:
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    csv = CSVLogger(tmp_path, name="csv")
    wandb_logger = WandbLogger(save_dir=tmp_path / "wb", offline=True, project="sp")
    mlflow_logger = MLFlowLogger(experiment_name="sp", tracking_uri=file_store)
    comet_logger = CometLogger(offline_directory=str(offline_comet), project="sp")
    mine = Recorder()
    fit = trainer([tensorboard, csv, wandb_logger, mlflow_logger, comet_logger], tmp_path)
    sinks = image_sinks(fit, extra=[mine])
    # the CSV logger gets no PNG copies: the others show the pictures
    assert [type(sink) for sink in sinks] == [TensorBoardSink, WandbSink, MlflowSink, CometSink, Recorder]
    timelapse = Path(run_directory(fit), "probe_00.gif")
    assert timelapse.parent == Path(tensorboard.log_dir).absolute()  # the first logger's run directory
    timelapse.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(as_bytes(picture(5))).save(timelapse)
    images = {TAG: picture(1), OVERVIEW: picture(2)}
    for sink in sinks:
        sink.log_images(images, step=11, caption="step 11 · epoch 0")
        sink.log_animation(TAG, str(timelapse), step=11)
        sink.close()
    offline_wandb()
    comet_logger.experiment.end()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sp_lightning.sinks.mlflow import local_artifact_dir

    events = EventAccumulator(tensorboard.log_dir, size_guidance={"images": 0})
    events.Reload()
    for tag, image in images.items():
        assert [event.step for event in events.Images(tag)] == [11]
        assert_png_holds(events.Images(tag)[0].encoded_image_string, image, rounded=False)
        stored = wandb_images(wandb_logger, tag)
        assert [(step, caption) for step, caption, _ in stored] == [(11, "step 11 · epoch 0")]
        assert_png_holds(stored[0][2], image)
        assert_png_holds(mlflow_images(mlflow_logger, tag)[11], image)
        assert comet_images(comet_logger, offline_comet, tag)[11][0] == "step 11 · epoch 0"
        assert_png_holds(comet_images(comet_logger, offline_comet, tag)[11][1], image)
        assert not os.path.exists(png_path(csv.log_dir, tag, 11))
    animation = timelapse.read_bytes()
    assert Path(wandb_logger.experiment.dir, timelapse.name).read_bytes() == animation  # a live-synced run file
    assert Path(local_artifact_dir(mlflow_logger), *TAG.split("/"), timelapse.name).read_bytes() == animation
    assert mine.calls == [("images", (sorted(images), 11, "step 11 · epoch 0")),
                          ("animation", (TAG, str(timelapse), 11)), ("close", None)]


def test_a_user_sink_receives_every_call_and_only_sinks_are_accepted(tmp_path: Path) -> None:
    mine = Recorder()
    (tensorboard, sink) = image_sinks(trainer(TensorBoardLogger(tmp_path), tmp_path), extra=[mine])
    assert sink is mine
    sink.log_images({TAG: picture(0)}, step=3, caption="step 3")
    sink.log_animation(TAG, "run/timelapse.gif", step=3)
    sink.close()
    assert mine.calls == [("images", ([TAG], 3, "step 3")), ("animation", (TAG, "run/timelapse.gif", 3)),
                          ("close", None)]
    with pytest.raises(TypeError, match="ImageSink"):
        image_sinks(trainer(False, tmp_path), extra=[print])


def test_the_image_sink_docstring_example_runs() -> None:
    result = doctest.testmod(base, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0


def test_ranks_other_than_zero_get_no_sinks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fit = trainer(CSVLogger(tmp_path), tmp_path)
    monkeypatch.setattr(pl.Trainer, "global_rank", property(lambda self: 1))
    assert image_sinks(fit) == []
    with pytest.raises(RuntimeError, match="rank 0"):
        run_directory(fit)
    assert not (tmp_path / "lightning_logs").exists()


def test_the_package_works_without_wandb_mlflow_and_comet(tmp_path: Path) -> None:
    code = f"""
import sys
sys.modules.update(wandb=None, mlflow=None, comet_ml=None)  # 'import wandb' now fails as if not installed
import lightning.pytorch as pl, torch
from lightning.pytorch.loggers import CSVLogger
from sp_lightning.sinks import image_sinks, png_path
(sink,) = image_sinks(pl.Trainer(logger=CSVLogger({str(tmp_path)!r}), enable_progress_bar=False))
sink.log_images({{{TAG!r}: torch.ones(3, 4, 4)}}, step=1, caption="")
print(png_path(sink.directory, {TAG!r}, 1))
"""
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_png_holds(done.stdout.strip(), torch.ones(3, 4, 4))
