"""README and docs/ hold together: links land, shown commands name recipes and flags that exist, and
README keeps its two set-up commands (the walk-through itself runs in tests/test_readme.py)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Written on another branch for issue 26 (clusters: AWS, Slurm, Kubernetes); README links it already.
ARRIVING = {ROOT / "docs" / "cluster.md"}


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", page.read_text(), re.M)}


def bash_lines(page: Path) -> list[str]:
    """Every command line of the page's bash blocks, continuation lines joined."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        lines += [line for line in block.replace("\\\n", " ").splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
    return lines


def test_every_relative_link_in_readme_and_docs_lands_on_a_file_and_heading():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if dest in ARRIVING:
                continue
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_commands_shown_name_recipes_and_flags_that_exist():
    unknown = []
    for page in PAGES:
        for line in bash_lines(page):
            for folder, name, rest in re.findall(r"\b(pipelines|benchmarks)/(\w+)\.py([^;&|]*)", line):
                script = ROOT / folder / f"{name}.py"
                if not script.is_file():
                    unknown.append(f"{page.name}: {folder}/{name}.py")
                    continue
                source = script.read_text()
                unknown += [f"{page.name}: {folder}/{name}.py {flag}"
                            for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest.split("#")[0])
                            if f'"{flag}"' not in source]
    assert not unknown, unknown


def test_readme_keeps_two_setup_commands_and_ci_runs_its_test_command():
    first = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    commands = [line for line in first.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert main_job.startswith("pip install -e . && python pipelines/demo.py"), main_job
    assert tests.startswith('pip install -e ".[test]" && ') and "pytest" in tests, tests
    assert tests in (ROOT / ".ci" / "run").read_text()  # .ci/run runs README's test command
