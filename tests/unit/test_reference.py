from dist_ft.recipe.reference import reference
from tests.conftest import ROOT


def test_recipe_reference_in_docs_is_current():
    committed = (ROOT / "docs" / "recipe-reference.md").read_text()
    assert committed.strip() == reference().strip(), \
        "run: python -m dist_ft.recipe.reference > docs/recipe-reference.md"
