from dist_ft.reference import reference
from tests.conftest import ROOT


def test_recipe_reference_in_docs_is_current():
    committed = (ROOT / "docs" / "recipe-reference.md").read_text()
    assert committed.strip() == reference().strip(), "run: python -m dist_ft.reference > docs/recipe-reference.md"
