"""docs/pytorch.md's "coming from" table runs: both columns of every row, each backticked span
in order in one namespace (a small BatchNorm model, a step, a loader of inputs, HF's args), so
the code a reader copies from either side works with the installed libraries."""
import pathlib
import re

import pytest

torch = pytest.importorskip("torch")
for name in ("timm", "diffusers", "ema_pytorch", "lightning", "transformers", "accelerate"):
    pytest.importorskip(name)

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "pytorch.md"
MARKER = "<!-- coming-from table: python/tests/test_dropin_docs.py runs both columns of every row -->"


def rows():
    lines = DOC.read_text().splitlines()
    start = lines.index(MARKER) + 3  # past the header and its rule
    out = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        assert len(cells) == 2, line
        out.append(cells)
    return out


ROWS = rows()


def test_the_table_covers_each_library():
    sources = [left.split(":")[0] for left, _ in ROWS]
    assert sources == ["timm", "diffusers", "ema-pytorch", "torch", "torch SWA", "Lightning", "HF"]


@pytest.mark.parametrize("column", ["coming from", "polyak"])
@pytest.mark.parametrize("row", ROWS, ids=[left.split(":")[0] for left, _ in ROWS])
def test_snippet_runs(row, column, tmp_path):
    import transformers
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    model(torch.randn(6, 4))  # BatchNorm statistics of its own
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    namespace = {"model": model, "step": 1, "loader": [torch.randn(4, 4) for _ in range(2)], "args": args}
    code = re.findall(r"`([^`]+)`", row[0 if column == "coming from" else 1])
    assert code
    for span in code:
        exec(span, namespace)
