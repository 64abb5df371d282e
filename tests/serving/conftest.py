from tests.sampling.conftest import gpt_export  # noqa: F401 - the same random GPT export as the sampling tests
