"""The README's export table is the one `hfqat.export.capabilities` generates from the exporters' scheme tables."""

from pathlib import Path

from hfqat.export.capabilities import capabilities, markdown_table, readme_section
from hfqat.export.compressed_tensors import CT_SCHEMES

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_is_the_generated_one():
    assert readme_section(README.read_text()) == markdown_table(), (
        "README export table is stale: run python -m hfqat.export.capabilities README.md")


def test_every_compressed_tensors_scheme_has_a_row():
    rows = capabilities()
    for scheme in CT_SCHEMES:
        assert any(f"({scheme.ct_format})" in row.export and row.engines == scheme.engines_for(scheme.bits[0])
                   for row in rows)
