"""The one image-to-logits pipeline behind evaluate/predict, its top-k decoding, argument checks and image folders."""
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

import resnetv2_zoo  # noqa: F401  (registers the models with timm)
from resnetv2_zoo.cli import build_parser, main
from resnetv2_zoo.errors import ResNetV2ZooError
from resnetv2_zoo.train.data import (
    build_transforms,
    image_files_under,
    load_rgb,
    scan_image_folder,
    scan_labelled_folder,
)
from resnetv2_zoo.train.evaluate import class_index, classification_report, evaluate_folder, format_report
from resnetv2_zoo.train.predict import predict_files
from resnetv2_zoo.train.runtime import predict_samples
from resnetv2_zoo.weights.checkpoint import load_model, save_model_dir
from resnetv2_zoo.weights.decode import top_k_labels
from resnetv2_zoo.weights.pretrained import decode_predictions

ARCH = 'resnet50v2_keras'
CLASSES = ('a', 'b', 'c')
COLORS = {'a': (220, 30, 30), 'b': (30, 200, 40), 'c': (20, 40, 210)}


@pytest.fixture(scope='module')
def classifier(tmp_path_factory) -> Path:
    """A 3-class model directory (label names a, b, c), randomly initialized: predictions differ per colour."""
    torch.manual_seed(0)
    return save_model_dir(timm.create_model(ARCH, num_classes=3), tmp_path_factory.mktemp('clf') / 'model', CLASSES)


def image_folder(root: Path, classes=CLASSES, per_class: int = 2) -> Path:
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shade = np.array(COLORS[name]) - 15 * i
            Image.new('RGB', (20, 16), tuple(int(v) for v in shade)).save(root / name / f'{i}.png')
    return root


def entries(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob('*'))


# --- predict_samples: the one pipeline ---

@pytest.mark.slow
def test_predict_samples_matches_the_model_in_sample_order_and_keeps_the_rng(classifier, tmp_path):
    root = image_folder(tmp_path / 'data')
    samples = [(str(p), i % 3) for i, p in enumerate(sorted(root.rglob('*.png')))]
    model = load_model(classifier).eval()
    transform = build_transforms(model, 32, augment=False)[1]
    with torch.inference_mode():
        expected = model(torch.stack([transform(load_rgb(p)) for p, _ in samples]))

    rng = torch.random.get_rng_state()
    logits, targets = predict_samples(model, samples, transform, torch.device('cpu'), batch_size=4)
    assert torch.equal(torch.random.get_rng_state(), rng)  # validation inside training leaves its RNG alone
    list(torch.utils.data.DataLoader(range(4)))  # control: a DataLoader without its own generator draws from it
    assert not torch.equal(torch.random.get_rng_state(), rng)

    assert logits.dtype == torch.float32 and logits.device.type == 'cpu' and targets.dtype == torch.int64
    assert targets.tolist() == [t for _, t in samples]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits[0], logits[-1])  # control: different images, different logits
    reversed_logits, _ = predict_samples(model, samples[::-1], transform, torch.device('cpu'), batch_size=3)
    torch.testing.assert_close(reversed_logits, expected.flip(0), rtol=1e-5, atol=1e-5)

    # A DistributedSampler shard per rank: together they cover every sample once, each in its shard's order.
    shards = [predict_samples(model, samples, transform, torch.device('cpu'), batch_size=2,
                              sampler=torch.utils.data.DistributedSampler(samples, 2, rank, shuffle=False))
              for rank in range(2)]
    for rank, (shard_logits, shard_targets) in enumerate(shards):
        torch.testing.assert_close(shard_logits, expected[rank::2], rtol=1e-5, atol=1e-5)
        assert shard_targets.tolist() == [t for _, t in samples[rank::2]]

    empty_logits, empty_targets = predict_samples(model, [], transform, torch.device('cpu'))
    assert empty_logits.shape == (0, 3) and empty_targets.shape == (0,)


@pytest.mark.slow
def test_evaluate_and_predict_use_the_pipeline_and_agree(classifier, tmp_path, capsys):
    root = image_folder(tmp_path / 'data')
    report = evaluate_folder(str(classifier), str(root), img_size=32, batch_size=4)
    predictions = predict_files(str(classifier), [str(root)], k=1, img_size=32, batch_size=5)
    assert capsys.readouterr().out == ''  # library calls print nothing; only the commands print their output
    files = sorted(str(p) for p in root.rglob('*.png'))
    assert [p.path for p in predictions] == files
    predicted = [CLASSES.index(p.top[0][0]) for p in predictions]
    truth = [CLASSES.index(Path(f).parent.name) for f in files]
    confusion = np.zeros((3, 3), dtype=int)
    np.add.at(confusion, (truth, predicted), 1)
    assert report.confusion == confusion.tolist()
    assert report.accuracy == pytest.approx(np.mean(np.array(truth) == np.array(predicted)))


# --- one top-k decoding ---

def test_top_k_labels_is_the_decoding_of_predict_and_decode_predictions():
    logits = torch.full((2, 1000), -5.0)
    logits[0, 1], logits[0, 0], logits[1, 999] = 3.0, 2.0, 1.0
    probs = logits.softmax(1)
    names = [str(i) for i in range(1000)]
    assert [(n, round(p, 6)) for n, p in top_k_labels(logits, names, 2)[0]] == [
        ('1', round(probs[0, 1].item(), 6)), ('0', round(probs[0, 0].item(), 6))]
    keras_like = decode_predictions(logits, top=2)
    ours = top_k_labels(logits, names, 2)
    assert [[p for *_, p in row] for row in keras_like] == [[p for _, p in row] for row in ours]
    # bf16 logits are decoded in float32: the same ranking and probabilities as float32 logits of those values
    half = logits.bfloat16()
    assert top_k_labels(half, names, 3) == top_k_labels(half.float(), names, 3)
    # k above the class count is clipped
    small = torch.tensor([[0.0, 1.0, 2.0]])
    assert [n for n, _ in top_k_labels(small, 'xyz', 10)[0]] == ['z', 'y', 'x']
    with pytest.raises(ValueError, match=r'\(batch, 4\), got \(1, 3\)'):
        top_k_labels(small, 'wxyz', 1)


def test_predict_top_k_above_the_class_count_is_clipped(classifier, tmp_path, capsys):
    image = tmp_path / 'x.png'
    Image.new('RGB', (8, 8), (200, 10, 10)).save(image)
    assert main(['predict', str(classifier), str(image), '--top-k', '50', '--img-size', '32', '--json']) == 0
    (prediction,) = json.loads(capsys.readouterr().out)
    assert sorted(name for name, _ in prediction['top']) == list(CLASSES)
    assert sum(p for _, p in prediction['top']) == pytest.approx(1.0, abs=1e-5)


# --- item 6: arguments validated by the parser ---

@pytest.mark.parametrize('argv, option, expected', [
    (['predict', 'CKPT', 'IMG', '--top-k', '0'], '--top-k', 'expected a positive integer, got 0'),
    (['predict', 'CKPT', 'IMG', '--top-k', '-1'], '--top-k', 'expected a positive integer, got -1'),
    (['predict', 'CKPT', 'IMG', '--top-k', 'many'], '--top-k', "expected an integer, got 'many'"),
    (['predict', 'CKPT', 'IMG', '--batch-size', '0'], '--batch-size', 'expected a positive integer, got 0'),
    (['predict', 'CKPT', 'IMG', '--workers', '-1'], '--workers', 'expected 0 or more, got -1'),
    (['predict', 'CKPT', 'IMG', '--img-size', '0'], '--img-size', 'expected an image size from 32 to 2048'),
    (['evaluate', 'CKPT', '--data', 'D', '--batch-size', '-3'], '--batch-size', 'positive integer, got -3'),
    (['evaluate', 'CKPT', '--data', 'D', '--workers', '-2'], '--workers', 'expected 0 or more, got -2'),
    (['evaluate', 'CKPT', '--data', 'D', '--img-size', '16'], '--img-size', 'from 32 to 2048 pixels, got 16'),
    (['evaluate', 'CKPT', '--data', 'D', '--img-size', '99999'], '--img-size', 'from 32 to 2048 pixels, got 99999'),
])
def test_bad_numbers_are_refused_by_the_parser(argv, option, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    (error_line,) = [line for line in err.splitlines() if 'error:' in line]
    assert error_line == f'resnetv2-zoo {argv[0]}: error: argument {option}: {expected}' or (
        error_line.startswith(f'resnetv2-zoo {argv[0]}: error: argument {option}: ') and expected in error_line)
    assert 'Traceback' not in err and os.listdir(tmp_path) == []


def test_good_numbers_pass_the_parser():
    args = build_parser().parse_args(['predict', 'C', 'I', '--top-k', '3', '--batch-size', '1', '--workers', '0',
                                      '--img-size', '32'])
    assert (args.top_k, args.batch_size, args.workers, args.img_size) == (3, 1, 0, 32)


# --- item 11: image folders ---

def test_hidden_and_appledouble_files_are_ignored_without_a_warning(tmp_path, caplog):
    root = image_folder(tmp_path / 'data', ('a', 'b'))
    (root / 'a' / '._0.png').write_bytes(b'\x00\x05\x16\x07' + b'\x00' * 60)  # an AppleDouble resource fork
    (root / 'b' / '.hidden.png').write_bytes(b'not an image')
    (root / 'b' / '.thumbnails').mkdir()
    (root / 'b' / '.thumbnails' / 'x.png').write_bytes(b'not an image either')
    (root / '__MACOSX' / 'a').mkdir(parents=True)  # what a zip from macOS unpacks beside the content
    (root / '__MACOSX' / 'a' / '._0.png').write_bytes(b'\x00\x05\x16\x07')
    (root / '.Trashes').mkdir()
    with caplog.at_level(logging.INFO):
        scan = scan_image_folder(root)
        files = image_files_under([root])
    assert scan.classes == ['a', 'b'] and scan.skipped == [] and caplog.text == ''
    assert sorted(p for p, _ in scan.samples) == files == sorted(str(p) for p in root.glob('[ab]/[01].png'))
    # control: the same bytes under a visible name are tried, warned about and counted
    (root / 'a' / 'resource.png').write_bytes(b'\x00\x05\x16\x07' + b'\x00' * 60)
    with caplog.at_level(logging.WARNING):
        scan = scan_image_folder(root)
    assert [Path(p).name for p, _ in scan.skipped] == ['resource.png'] and 'resource.png' in caplog.text


def animated_gif(path: Path, first=(250, 0, 0), second=(0, 0, 250)) -> Path:
    frames = [Image.new('RGB', (24, 24), first), Image.new('RGB', (24, 24), second)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


@pytest.mark.slow
def test_animated_gif_uses_its_first_frame_and_is_reported(classifier, tmp_path, capsys):
    assert '.gif' not in IMG_EXTENSIONS  # control: why GIFs used to vanish from folders without a word
    root = image_folder(tmp_path / 'data')
    gif = animated_gif(root / 'a' / 'anim.gif')
    Image.new('RGB', (24, 24), (0, 250, 0)).save(root / 'b' / 'still.gif')
    scan = scan_image_folder(root)
    assert {(str(gif), 0), (str(root / 'b' / 'still.gif'), 1)} <= set(scan.samples)
    assert scan.animated == [str(gif)] and scan.skipped == []
    assert load_rgb(gif).getpixel((5, 5)) == (250, 0, 0)

    first = tmp_path / 'first.png'
    Image.new('RGB', (24, 24), (250, 0, 0)).save(first)
    second = tmp_path / 'second.png'
    Image.new('RGB', (24, 24), (0, 0, 250)).save(second)
    by_gif, by_first, by_second = predict_files(str(classifier), [str(gif), str(first), str(second)], k=3, img_size=32)
    assert by_gif.top == by_first.top and by_gif.top != by_second.top

    assert main(['evaluate', str(classifier), '--data', str(root), '--img-size', '32']) == 0
    out = capsys.readouterr().out
    assert f'1 animated image(s) scored on their first frame:\n  {gif}' in out and 'on 8 images' in out


@pytest.mark.slow
def test_evaluate_accepts_any_subset_of_the_checkpoint_classes(classifier, tmp_path, capsys):
    full = evaluate_folder(str(classifier), str(image_folder(tmp_path / 'full')), img_size=32)
    only_b = evaluate_folder(str(classifier), str(image_folder(tmp_path / 'b', ('b',))), img_size=32)
    b_row = full.confusion[1]  # the same images, scored against the same 3-class head
    seen = [i for i, n in enumerate(b_row) if n] + ([1] if not b_row[1] else [])
    assert [c.name for c in only_b.classes] == [CLASSES[i] for i in sorted(seen)]
    assert only_b.num_images == 2 and only_b.accuracy == pytest.approx(b_row[1] / 2)
    assert only_b.confusion[[c.name for c in only_b.classes].index('b')] == [b_row[i] for i in sorted(seen)]

    unknown = image_folder(tmp_path / 'unknown', ('b',))
    (unknown / 'zebra').mkdir()
    Image.new('RGB', (8, 8)).save(unknown / 'zebra' / '0.png')
    assert main(['evaluate', str(classifier), '--data', str(unknown), '--img-size', '32']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and "class folders ['zebra'] that" in err and 'Traceback' not in err
    (tmp_path / 'none').mkdir()
    with pytest.raises(ResNetV2ZooError, match='no class folder'):
        scan_labelled_folder(tmp_path / 'none', {'a': 0})
    assert scan_labelled_folder(unknown, {'zebra': 7, 'b': 1}).samples[-1] == (str(unknown / 'zebra' / '0.png'), 7)


def test_imagenet_folders_may_use_wordnet_ids_and_shared_names_are_refused():
    index, ambiguous = class_index(timm.create_model(ARCH))
    assert index['n01443537'] == index['goldfish, Carassius auratus'] == 1
    assert ambiguous == {'crane': [134, 517]} and 'crane' not in index
    assert index['n02012849'] == 134 and index['n03126707'] == 517  # the ids tell the two cranes apart


# --- item 12: evaluate writes files only when asked ---

@pytest.mark.slow
def test_evaluate_writes_nothing_unless_plot_is_given(classifier, tmp_path, monkeypatch, capsys):
    root = image_folder(tmp_path / 'data')
    work = tmp_path / 'work'
    work.mkdir()
    monkeypatch.chdir(work)
    before = entries(tmp_path)
    assert main(['evaluate', str(classifier), '--data', str(root), '--img-size', '32']) == 0
    assert 'accuracy' in capsys.readouterr().out and entries(tmp_path) == before

    Image.new('RGB', (4, 4)).save(work / 'cm.png')  # an earlier plot: a PNG may be replaced
    assert main(['evaluate', str(classifier), '--data', str(root), '--img-size', '32', '--plot', 'cm.png']) == 0
    assert 'confusion matrix plot: cm.png' in capsys.readouterr().out
    assert Image.open(work / 'cm.png').size != (4, 4) and os.listdir(work) == ['cm.png']

    notes = work / 'notes.png'
    notes.write_text('my notes, not a figure')
    for plot, message in ((str(notes), 'exists and is not a PNG image'), ('report.csv', 'name it *.png'),
                          ('missing/cm.png', 'folder missing does not exist'), (str(work), 'name it *.png')):
        assert main(['evaluate', str(classifier), '--data', str(root), '--plot', plot]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count('\n') == 1, err
    assert notes.read_text() == 'my notes, not a figure' and sorted(os.listdir(work)) == ['cm.png', 'notes.png']
    assert build_parser().parse_args(['evaluate', 'C', '--data', 'D', '--plot', '']).plot is None  # '' means none


def test_format_report_lists_skipped_files(classifier, tmp_path):
    root = image_folder(tmp_path / 'data', ('a',))
    (root / 'a' / 'broken.png').write_bytes(b'\x89PNG broken')
    report = evaluate_folder(str(classifier), str(root), img_size=32)
    assert [Path(p).name for p, _ in report.skipped] == ['broken.png'] and report.num_images == 2
    assert '1 unreadable file(s) left out:' in format_report(report)
    assert 'skipped' in report.to_dict() and 'animated' in report.to_dict()


def test_format_report_shortens_long_lists():
    report = classification_report(torch.tensor([0, 1]), torch.tensor([0, 0]), ['a', 'b'])
    report.animated = [f'/data/a/{i}.gif' for i in range(12)]
    text = format_report(report)
    assert '12 animated image(s)' in text and '/data/a/9.gif' in text and '/data/a/10.gif' not in text
    assert '... and 2 more (--json lists all)' in text and len(report.to_dict()['animated']) == 12
    assert report.confusion == [[1, 1], [0, 0]] and report.accuracy == 0.5
