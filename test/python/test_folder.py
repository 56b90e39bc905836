"""Tests of scripts/bamtrain/folder.py, the Python side's one folder I/O: the safetensors checks of
src/safetensors/reader.ts and checkpoint.ts (each damaged file refused with one line naming it, with the
`safetensors` package and with plain reads), writing read back by the `safetensors` package, and the
atomic folder swap with its recovery after a kill between the renames."""

import errno
import json
import os
import shutil
import struct
import sys
import tempfile
import unittest
from unittest import mock

import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
if os.path.join(REPO, "scripts") not in sys.path:
    sys.path.insert(0, os.path.join(REPO, "scripts"))

from bamtrain import BamTrainError, folder  # noqa: E402

CONFIG = dict(
    model_type="bam",
    vocab_size=61,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    num_experts=2,
    num_experts_per_tok=1,
    attention_experts="moa",
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def tiny_state():
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in folder.BamForCausalLMCore(dict(CONFIG)).state_dict().items()}


def both_readers(test):
    """Runs `test(self)` with the safetensors package and with plain reads."""

    def run(self):
        for lib in (folder.st_lib, None):
            with self.subTest(safetensors_package=lib is not None), mock.patch.object(folder, "st_lib", lib):
                test(self)

    return run


class TestSafetensors(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="bam-folder-test-")
        self.path = os.path.join(self.dir, "t.safetensors")
        self.tensors = [
            ("a", torch.arange(6, dtype=torch.float32).reshape(2, 3)),
            ("b", torch.ones(4, dtype=torch.bfloat16)),
            ("c", torch.tensor([1, -2], dtype=torch.int64)),
        ]

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def write_raw(self, header, data, pad=True):
        blob = json.dumps(header).encode() if isinstance(header, dict) else header
        if pad:
            blob += b" " * (-len(blob) % 8)
        with open(self.path, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob + data)

    def assertRefused(self, pattern):
        with self.assertRaisesRegex(BamTrainError, pattern) as cm:
            folder.read_safetensors(self.path)
        self.assertIn(self.path, str(cm.exception))
        self.assertNotIn("\n", str(cm.exception))

    @both_readers
    def test_round_trip_and_the_package_reads_what_we_write(self):
        folder.write_safetensors(self.path, self.tensors, {"format": "pt"})
        got = folder.read_safetensors(self.path)
        import safetensors.torch

        lib = safetensors.torch.load_file(self.path)
        for name, t in self.tensors:
            self.assertEqual(got[name].dtype, t.dtype)
            torch.testing.assert_close(got[name], t, rtol=0, atol=0)
            torch.testing.assert_close(lib[name], t, rtol=0, atol=0)
        self.assertEqual(folder.read_header(self.path)[2], {"format": "pt"})

    @both_readers
    def test_truncated_file_is_refused(self):
        folder.write_safetensors(self.path, self.tensors)
        with open(self.path, "r+b") as f:
            f.truncate(os.path.getsize(self.path) - 5)
        self.assertRefused("truncated")

    @both_readers
    def test_bytes_after_the_last_tensor_are_refused(self):
        folder.write_safetensors(self.path, self.tensors)
        with open(self.path, "ab") as f:
            f.write(b"\0" * 8)
        self.assertRefused("8 bytes after the last tensor belong to no tensor")

    @both_readers
    def test_header_checks(self):
        f32 = lambda shape, b, e: {"dtype": "F32", "shape": shape, "data_offsets": [b, e]}  # noqa: E731
        cases = [
            ({"a": f32([2], 0, 8), "b": f32([2], 4, 12)}, b"\0" * 12, "overlaps the previous tensor"),
            ({"a": f32([2], 0, 8), "b": f32([2], 12, 20)}, b"\0" * 20, "leaves a gap after data byte 8"),
            ({"a": f32([3], 0, 8)}, b"\0" * 8, r"needs 12 bytes but data_offsets span 8"),
            ({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "dtype Q4 is not supported"),
            ({"a": f32([-1], 0, 0)}, b"", "shape is not an array"),
            ({"a": f32([2], 8, 0)}, b"", "data_offsets is not"),
            ({"__metadata__": {"k": 1}}, b"", "must map strings to strings"),
            (b'{"a": {}, "a": {}}', b"", "repeats the key 'a'"),
            (b"[1, 2]", b"", "not a JSON object"),
            (b"\xff\xfe", b"", "not UTF-8 JSON"),
        ]
        for header, data, pattern in cases:
            with self.subTest(pattern):
                self.write_raw(header, data)
                self.assertRefused(pattern)
        with open(self.path, "wb") as f:
            f.write(struct.pack("<Q", 1000) + b"{}")
        self.assertRefused("header claims 1000 bytes but the file has only 2")
        with open(self.path, "wb") as f:
            f.write(b"abc")
        self.assertRefused("too short")


class TestFolders(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="bam-folder-test-")
        self.model = os.path.join(self.dir, "bam")
        self.state = tiny_state()
        folder.save_folder(self.model, self.state, CONFIG, max_shard_bytes=20_000)

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def test_sharded_folder_loads_the_saved_weights(self):
        self.assertTrue(os.path.exists(os.path.join(self.model, folder.INDEX)))
        model, config, dtype = folder.load_model(self.model)
        self.assertEqual(dtype, torch.float32)
        for name, t in model.state_dict().items():
            torch.testing.assert_close(t, self.state[name], rtol=0, atol=0, msg=name)

    def index(self):
        with open(os.path.join(self.model, folder.INDEX)) as f:
            return json.load(f)

    def write_index(self, index):
        with open(os.path.join(self.model, folder.INDEX), "w") as f:
            json.dump(index, f)

    def test_index_checks(self):
        index = self.index()
        name, file = next(iter(index["weight_map"].items()))
        other = next(f for f in index["weight_map"].values() if f != file)
        for change, pattern in (
            (other, "not where weight_map puts it|listed in weight_map but missing"),
            ("../x.safetensors", "lies outside"),
            (None, "is not a file name"),
        ):
            with self.subTest(pattern):
                self.write_index(dict(index, weight_map=dict(index["weight_map"], **{name: change})))
                with self.assertRaisesRegex(BamTrainError, pattern):
                    folder.read_weights(self.model)
        self.write_index(dict(index, weight_map=dict(index["weight_map"], ghost=file)))
        with self.assertRaisesRegex(BamTrainError, "'ghost' is listed in weight_map but missing"):
            folder.read_weights(self.model)

    def test_damaged_weights_are_refused(self):
        """A truncated shard, and 400 bytes of 0xff (NaN) inside a tensor: refused, naming file / tensor."""
        index = self.index()
        name, file = sorted(index["weight_map"].items())[0]
        path = os.path.join(self.model, file)
        start, entries, _ = folder.read_header(path)
        with open(path, "r+b") as f:
            f.seek(start + entries[name][2])
            f.write(b"\xff" * 400)
        with self.assertRaisesRegex(BamTrainError, f"tensor '{name}' holds NaN or Inf"):
            folder.load_model(self.model)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        with self.assertRaisesRegex(BamTrainError, f"{path}: .*truncated"):
            folder.load_model(self.model)

    def test_dense_folder_is_refused_with_what_to_do(self):
        with self.assertRaisesRegex(BamTrainError, "not 'bam'; build a BAM folder with `bam upcycle`"):
            folder.load_model(os.path.join(REPO, "fixtures", "llama", "base"))

    def test_a_kill_between_the_renames_leaves_a_complete_folder(self):
        """replace_folder moves the old folder aside before the new one comes in; recover_folder puts it back
        when the process died between the two renames, and removes it when the swap had finished."""
        new = os.path.join(self.dir, "new")
        os.makedirs(new)
        real, calls = os.replace, []

        def killed_at_the_second_rename(src, dst):
            calls.append((src, dst))
            if len(calls) == 2:
                raise KeyboardInterrupt
            real(src, dst)

        with mock.patch.object(folder.os, "replace", killed_at_the_second_rename):
            with self.assertRaises(KeyboardInterrupt):
                folder.replace_folder(new, self.model)
        self.assertEqual(calls, [(self.model, folder._aside(self.model)), (new, self.model)])
        self.assertFalse(os.path.exists(self.model))
        folder.recover_folder(self.model)
        folder.load_model(self.model)  # the previous model, whole
        self.assertFalse(os.path.exists(folder._aside(self.model)))
        shutil.copytree(self.model, folder._aside(self.model))  # killed before deleting the old one
        os.makedirs(folder._staging(self.model))  # and an unfinished new one
        folder.recover_folder(self.model)
        self.assertEqual(sorted(os.listdir(self.dir)), ["bam", "new"])

    def test_disk_full_leaves_the_previous_folder(self):
        before = sorted(os.listdir(self.model))
        full = OSError(errno.ENOSPC, "No space left on device")
        with mock.patch.object(folder, "write_sharded", side_effect=full):
            with self.assertRaisesRegex(BamTrainError, f"{self.model}: disk full while writing the model folder"):
                folder.save_folder(self.model, self.state, CONFIG)
        self.assertEqual(sorted(os.listdir(self.model)), before)
        self.assertFalse(os.path.exists(folder._staging(self.model)))
        torch_full = RuntimeError(
            "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
            "data/0: file write failed\nframe #0: c10::Error ..."
        )
        self.assertIn("disk full", str(folder.write_error(self.model, torch_full, "x")))


if __name__ == "__main__":
    unittest.main()
