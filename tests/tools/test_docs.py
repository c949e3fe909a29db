"""The README's architecture table is the registry's (regenerate: python -m fxbridge.architectures.table)."""
from pathlib import Path

from fxbridge.architectures import REGISTRY
from fxbridge.architectures.table import BEGIN, END, markdown_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_architecture_table_is_generated_from_the_registry():
    text = README.read_text()
    table = text.partition(BEGIN)[2].partition(END)[0].strip()
    assert table == markdown_table(), "README architecture table is stale: python -m fxbridge.architectures.table"
    for model_type in REGISTRY:  # and every registered type has its row
        assert f"`{model_type}`" in table
