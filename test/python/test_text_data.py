"""Text data of scripts/finetune.py beyond .txt / .jsonl: .jsonl.gz (gzip, always) and .parquet (pyarrow or
pandas, where installed), files made here, tokenised with a fixture's tokenizer.json, compared token for
token with the same documents as .jsonl; damaged files and a missing parquet library are one line each.
The parquet round trip skips where pyarrow is not installed (requirements.txt does not pin it).
"""

import gzip
import json
import os
import shutil
import sys
import tempfile
import unittest
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(REPO, "scripts"))

from bamtrain import BamTrainError, data  # noqa: E402

try:
    import tokenizers  # noqa: F401

    HAS_TOKENIZERS = True
except ImportError:
    HAS_TOKENIZERS = False
try:
    import pyarrow  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    HAS_PYARROW = True
except ImportError:
    HAS_PYARROW = False

SEED = os.path.join(REPO, "fixtures", "llama", "base")  # has tokenizer.json; vocabulary 320
DOCS = ["The court held that the contract was void.", "def f(x):\n    return x + 1", "Let x be a real number."]
NO_PARQUET = {"pyarrow": None, "pyarrow.parquet": None, "pandas": None}


def tokens(paths, text_key="text"):
    stream = data.load_stream(paths, 0, data.Tokenizer(SEED), None, text_key, vocab=320)
    return stream.read(0, len(stream)).tolist()


@unittest.skipUnless(HAS_TOKENIZERS, "needs the tokenizers package")
class TestTextFiles(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="bam-text-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.jsonl = self.write(
            "docs.jsonl", "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS))
        )
        self.expected = tokens([self.jsonl])
        self.assertEqual(self.expected.count(0), len(DOCS))  # an EOS after each document

    def write(self, name, text, opener=open):
        path = os.path.join(self.dir, name)
        with opener(path, "wt", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_jsonl_gz_reads_as_jsonl(self):
        with open(self.jsonl) as f:
            gz = self.write("docs.jsonl.gz", f.read(), gzip.open)
        self.assertEqual(tokens([gz]), self.expected)
        self.assertEqual(data.expand([self.dir]), [self.jsonl, gz])  # a directory finds it too
        other = self.write("body.jsonl.gz", "".join(json.dumps({"body": d}) + "\n" for d in DOCS), gzip.open)
        self.assertEqual(tokens([other], "body"), self.expected)  # the text key as for .jsonl
        with self.assertRaisesRegex(
            BamTrainError,
            r"body.jsonl.gz: line 1 has no string field 'text' \(its keys: "
            r"body\); name the field with --text-key",
        ):
            tokens([other])

    def test_damaged_gzip_is_one_line(self):
        with open(os.path.join(self.dir, "docs.jsonl.gz"), "wb") as f:
            f.write(gzip.compress(b'{"text": "a"}\n' * 50)[:-12])  # cut off
        with open(os.path.join(self.dir, "plain.jsonl.gz"), "wb") as f:
            f.write(b'{"text": "not gzip"}\n')
        for name in ("docs.jsonl.gz", "plain.jsonl.gz"):
            with self.subTest(name), self.assertRaisesRegex(BamTrainError, f"{name}: not readable gzip text"):
                tokens([os.path.join(self.dir, name)])

    @unittest.skipUnless(HAS_PYARROW, "pyarrow is not installed (pip install pyarrow): the parquet round trip skips")
    def test_parquet_reads_as_jsonl(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = os.path.join(self.dir, "docs.parquet")
        pq.write_table(pa.table({"id": list(range(len(DOCS))), "text": DOCS}), path)
        self.assertEqual(tokens([path]), self.expected)
        with self.assertRaisesRegex(
            BamTrainError,
            r"docs.parquet: no column 'body' \(its columns: id, text\); name the "
            "column with --text-key",
        ):
            tokens([path], "body")

    def test_parquet_without_its_library_is_one_line(self):
        path = os.path.join(self.dir, "docs.parquet")
        with open(path, "wb") as f:
            f.write(b"PAR1 any bytes: the library is asked for first PAR1")
        with mock.patch.dict(sys.modules, NO_PARQUET):
            with self.assertRaisesRegex(
                BamTrainError,
                r"^[^\n]*docs.parquet: .parquet data needs pyarrow \(pip install "
                r"pyarrow\); or give the text as .jsonl / .jsonl.gz$",
            ):
                tokens([path])


if __name__ == "__main__":
    unittest.main()
