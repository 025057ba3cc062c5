"""docs/quantization.md carries the matrix the registry generates."""

from llmcore.quantization.docs import BEGIN, END, PAGE, matrix_markdown


def test_docs_matrix_matches_the_registry():
    text = PAGE.read_text()
    table = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == matrix_markdown(), "run: python -m llmcore.quantization.docs --write"
