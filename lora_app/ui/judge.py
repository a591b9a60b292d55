"""Runs tab, "Which adapter is best": a run's probe answers at every step next to its losses, blind
votes between two answers (of two steps, or of two runs), the ratings the votes give each step, and
promoting the best checkpoint to be the run's adapter for chat, compare and exports.

Everything shown is read from the run store (answers, votes, the promoted step), so a reload or a
restarted studio shows it all again.
"""

from __future__ import annotations

import html
import random

import gradio as gr

from lora_app.errors import UserError
from lora_app.training.probes import by_prompt, step_label
from lora_app.training.rating import next_pair, ratings
from lora_app.ui import charts
from lora_app.ui.common import run_store

FINAL = "final"  # the promotion choice that means the run's final adapter
WINNER_WORDS = {"a": "for A", "b": "for B", "tie": "a tie"}


def _runs(run_id, other_id) -> list:
    """The picked run, and the run its settings are compared with when there is one."""
    if not run_id:
        return []
    store = run_store()
    ids = [run_id] + ([other_id] if other_id and other_id != run_id else [])
    return [store.get(i) for i in ids]


def view(run_id, other_id):
    """(answers timeline, losses + score chart, rating chart, promotion choices, promotion note)."""
    runs = _runs(run_id, other_id)
    if not runs:
        return "", charts.probe_figure([], []), charts.rating_figure({}), gr.update(choices=[], value=None), ""
    store, run = run_store(), runs[0]
    answers = store.probe_answers(run.id)
    rated = ratings(store.votes(*[r.id for r in runs]))
    choices = [("final adapter", FINAL)] + [(f"checkpoint at step {s}", str(s)) for s in run.checkpoint_steps()]
    current = FINAL if run.promoted_step is None else str(run.promoted_step)
    return (timeline_html(run, answers, rated), charts.probe_figure(store.metrics(run.id), answers),
            rating_chart(runs, rated), gr.update(choices=choices, value=current), promotion_note(run))


def timeline_html(run, answers: list[dict], rated: dict) -> str:
    """Each probe prompt with the run's answer at every step (step 0 is the base model), its token F1
    where the prompt has a reference, and its blind-vote rating once voted on."""
    if not answers:
        return ("<p class='lora-note'>No probe answers for this run. Give a run probe prompts (Train tab) or probe "
                "rows, with 'eval every' or 'save every' set, and it answers them as it trains.</p>")
    blocks = []
    for prompt, timeline in by_prompt(answers).items():
        reference = timeline[0]["reference"]
        rows = []
        for a in timeline:
            promoted = " ★ promoted" if a["step"] == run.promoted_step else ""
            score = "–" if a["score"] is None else f"{a['score']:.2f}"
            rating = rated.get((run.id, a["step"]))
            rows.append(f"<tr data-step='{a['step']}'><td>{html.escape(step_label(a['step']))}{promoted}</td>"
                        f"<td>{html.escape(a['answer']) or '<i>(empty)</i>'}</td><td>{score}</td>"
                        f"<td>{'–' if rating is None else f'{rating:.0f}'}</td></tr>")
        shown_reference = f"<p><b>reference:</b> {html.escape(reference)}</p>" if reference is not None else ""
        blocks.append(f"<div class='lora-probe'><h4>{html.escape(prompt)}</h4>{shown_reference}<table>"
                      f"<tr><th>step</th><th>answer</th><th>F1</th><th>rating</th></tr>{''.join(rows)}</table></div>")
    return "".join(blocks)


def rating_chart(runs, rated: dict):
    names = {r.id: r.name for r in runs}
    series: dict[str, list[tuple[int, float]]] = {}
    for (run_id, step), rating in rated.items():
        if run_id in names:
            series.setdefault(names[run_id], []).append((step, rating))
    return charts.rating_figure(series)


def promotion_note(run) -> str:
    if run.promoted_step is None:
        return "Chat, compare and exports use the **final adapter**."
    return (f"Chat, compare and exports use the **checkpoint at step {run.promoted_step}** (promoted); the final "
            "adapter is kept: promote it to go back.")


def draw_pair(run_id, other_id):
    """A blind pair: (the two answers with their origins hidden, the pair kept for the vote)."""
    runs = _runs(run_id, other_id)
    if not runs:
        raise UserError("Pick a run first.")
    store = run_store()
    answers = store.probe_answers(*[r.id for r in runs])
    pair = next_pair(answers, store.votes(*[r.id for r in runs]), random.Random())
    if pair is None:
        raise UserError("There are no two different answers to one prompt to compare yet: a run with probe prompts "
                        "answers them at step 0 and at every evaluation and checkpoint.")
    return pair_html(pair), pair


def pair_html(pair: dict) -> str:
    columns = "".join(f"<div class='lora-column' data-side='{side}'><h4>Answer {side.upper()}</h4>"
                      f"<p>{html.escape(pair[side + '_answer']) or '<i>(empty)</i>'}</p></div>" for side in ("a", "b"))
    return f"<div class='lora-pair'><p><b>Prompt:</b> {html.escape(pair['prompt'])}</p><div class='lora-compare'>{columns}</div></div>"


def vote(pair, run_id, other_id, *, winner: str):
    """Store the vote on the pair shown, say which answer was which, and show the next pair:
    (status, timeline, rating chart, next pair's html, next pair)."""
    if not pair:
        raise UserError("Show a pair first (Next blind pair).")
    store = run_store()
    store.add_vote(pair["prompt"], tuple(pair["a"]), tuple(pair["b"]), winner)

    def origin(side):
        run, step = pair[side]
        return f"{store.get(run).name}, {step_label(step)}"

    said = f"Voted {WINNER_WORDS[winner]}: A was {origin('a')}; B was {origin('b')}."
    timeline, _, rating, _, _ = view(run_id, other_id)
    try:
        shown, following = draw_pair(run_id, other_id)
    except UserError:
        shown, following = "", None
    return said, timeline, rating, shown, following


def promote(run_id, choice):
    """(note, timeline) after making ``choice`` (a step, or FINAL) the run's adapter."""
    if not run_id:
        raise UserError("Pick a run first.")
    if not choice:
        raise UserError("Choose the checkpoint to promote.")
    store = run_store()
    run = store.promote(run_id, None if choice == FINAL else int(choice))
    return promotion_note(run), timeline_html(run, store.probe_answers(run.id), ratings(store.votes(run.id)))


def build(ui) -> None:
    with gr.Accordion("Which adapter is best: probe answers, blind votes, promotion", open=True):
        gr.Markdown("The run's answers to its probe prompts at every step (step 0: the base model). Vote blind "
                    "between two answers -- of two steps of this run, or of this run and the one in *Compare settings "
                    "with* -- and the ratings show which step answers best; promote that checkpoint to chat with it "
                    "and export it.")
        with gr.Row():
            with gr.Column(scale=3):
                ui.probe_timeline = gr.HTML(elem_id="probe-timeline")
            with gr.Column(scale=2):
                ui.probe_chart = gr.Plot(show_label=False, elem_id="probe-chart")
        with gr.Row():
            with gr.Column(scale=3):
                ui.vote_next = gr.Button("Next blind pair", size="sm", elem_id="vote-next")
                ui.vote_pair = gr.HTML(elem_id="vote-pair")
                with gr.Row():
                    ui.vote_a = gr.Button("A is better", size="sm", elem_id="vote-a")
                    ui.vote_tie = gr.Button("Tie", size="sm", elem_id="vote-tie")
                    ui.vote_b = gr.Button("B is better", size="sm", elem_id="vote-b")
                ui.vote_status = gr.Markdown(elem_id="vote-status")
            with gr.Column(scale=2):
                ui.rating_chart = gr.Plot(show_label=False, elem_id="rating-chart")
        with gr.Row(equal_height=True):
            ui.promote_step = gr.Dropdown([], label="Adapter for chat, compare and exports", scale=2,
                                          elem_id="promote-step")
            ui.promote = gr.Button("Promote", size="sm", scale=1, elem_id="promote")
        ui.promote_note = gr.Markdown(elem_id="promote-note")
        ui.vote_state = gr.State(None)
