"""Free-form answers judged by an LLM: the paper's MT-Bench study (Dutta et al. 2024, §5) as a command.

- :mod:`.prompts`: the prompt set (flipcheck's JSONL, MT-Bench's question.jsonl, or ``hf:NAME``);
- :mod:`.generate`: parent and child answers (chat template, greedy, multi-turn), cached on disk;
- :mod:`.grading`: the project's grading prompts (versioned) and the parsing of the judge's replies;
- :mod:`.client`: the judge behind an OpenAI-compatible endpoint (preflight, retries, cache, threads);
- :mod:`.stats`: mean scores with a paired interval, win/tie/loss, worst prompts, correlations;
- :mod:`.report`: the judge section of report.md / report.html;
- :mod:`.run`: ``flipcheck judge`` and a recipe's ``judge:`` section.
"""

from flipcheck.evaluation.report.sections import register_section
from flipcheck.judge.report import judge_html, judge_markdown

register_section("judge", judge_markdown, judge_html)  # report.md / report.html draw it where a report has one
