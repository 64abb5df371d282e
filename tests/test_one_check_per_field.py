"""Each config field is checked in one place: its block's spec (README, "Config").

Read from the source (ast): every `config_lib.require*` call and every ConfigError raised in fvq_jax/ sits in a
class deriving from config_lib.Spec (the `__post_init__` that checks a block's fields, or a method judging the
resolved spec against something else: the devices, the image size, the run's saved blocks), or in a task's
`resolve`. What stays outside is listed below with its reason: checks of a resolved value against the world the
run meets (the files on disk, a checkpoint, the devices of this process), which no config check can do earlier.
"""

import ast

from tests.conftest import ROOT

PACKAGE = ROOT / "fvq_jax"
CHECKS = {"require", "require_choice", "require_number", "ConfigError"}

# (module, function) -> why the check cannot live in a spec.
OUTSIDE_SPECS = {
    ("models/factory.py", "compute_dtype"): "the one check of `precision`: run specs call it, and so does the "
                                            "loading of a saved config (models/load.py)",
    ("models/factory.py", "arch_fields"): "the `model=` key of configs/tokenizer.py's argument, a preset name that "
                                          "no block keeps",
    ("data/pipeline.py", "local_batch_size"): "a batch against this job's process count",
    ("data/sources.py", "FolderSource.__init__"): "the image folder on disk",
    ("data/sources.py", "TfdsSource.__init__"): "the TFDS dataset on disk",
    ("data/sources.py", "_not_prepared"): "the TFDS dataset on disk",
    ("data/sources.py", "PhotoSource.__init__"): "the held-out photos against the image size",
    ("data/sources.py", "split_source"): "the photos' splits",
    ("extraction/job.py", "check_tokenizer"): "the tokenizer's saved config",
    ("extraction/job.py", "batch_size"): "the batch against this job's devices",
    ("extraction/manifest.py", "refuse_changes"): "the extraction already in the output directory",
    ("sampling/images.py", "decoding_tokenizer"): "the tokenizer against the GPT it decodes",
    ("sampling/job.py", "sample_run"): "the sample count against the GPT's classes",
    ("sampling/job.py", "_claim"): "the samples already in the output folder",
    ("evaluation/scoring.py", "Scorer._tokenizer"): "the samples' sampling.json",
    ("train/resume.py", "resume_or_init"): "train.restore_step against the saved steps",
    ("train/gpt.py", "_init_from.init"): "train.init_from's arrays against this run's",
}


def _is_check(call: ast.Call) -> bool:
    f = call.func
    if isinstance(f, ast.Attribute):
        return f.attr in CHECKS and isinstance(f.value, ast.Name) and f.value.id == "config_lib"
    return isinstance(f, ast.Name) and f.id == "ConfigError"


def _checks(tree: ast.AST, scope: tuple[ast.AST, ...] = ()):
    """(enclosing classes and functions, line) of every check in `tree`."""
    for node in ast.iter_child_nodes(tree):
        inner = scope + (node,) if isinstance(node, (ast.ClassDef, ast.FunctionDef)) else scope
        if isinstance(node, ast.Call) and _is_check(node):
            yield scope, node.lineno
        yield from _checks(node, inner)


def _spec_classes(trees) -> set[str]:
    """Names of the classes deriving from config_lib.Spec, directly or through another spec."""
    bases = {node.name: {ast.unparse(b).split(".")[-1] for b in node.bases}
             for tree in trees for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    specs, grown = {"Spec"}, True
    while grown:
        new = {name for name, of in bases.items() if of & specs} - specs
        specs |= new
        grown = bool(new)
    return specs


def test_every_config_check_is_in_a_spec_or_a_tasks_resolve():
    trees = {path.relative_to(PACKAGE).as_posix(): ast.parse(path.read_text()) for path in PACKAGE.rglob("*.py")}
    specs = _spec_classes(trees.values())
    outside, used = [], set()
    for module, tree in trees.items():
        if module == "config_lib.py":
            continue
        for scope, line in _checks(tree):
            if any(isinstance(s, ast.ClassDef) and s.name in specs for s in scope):
                continue
            if any(isinstance(s, ast.FunctionDef) and s.name == "resolve" for s in scope):
                continue
            key = (module, ".".join(s.name for s in scope))
            used.add(key)
            if key not in OUTSIDE_SPECS:
                outside.append(f"fvq_jax/{module}:{line} in {key[1] or 'module level'}")
    assert not outside, "config checks outside a spec or a task's resolve:\n" + "\n".join(outside)
    assert used == set(OUTSIDE_SPECS), f"allowed but gone (drop them from the list): {set(OUTSIDE_SPECS) - used}"


def test_no_check_function_of_a_whole_block_remains():
    """The functions that checked blocks by hand (check_train_config, check_optim_config, check_tokenizer_config,
    check_eval_config, the tasks' check_config) are gone: their blocks are specs. (resume.check_resume_config
    compares a whole config with the one a checkpoint saved: no field's value.)"""
    names = {node.name for path in PACKAGE.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.FunctionDef)}
    assert {name for name in names if name.startswith("check_") and name.endswith("config")} == {"check_resume_config"}
