"""The bot's flow of every mode comes from its row in `media.MODE_SPECS` (issue 10 §4).

Each test walks a mode only by reading its spec — the questions it asks (text keys), the images
it takes, its typed input, its options — and checks that the bot asks exactly that, in that
order, and ends in a queued job (paid) or a picture (local) with the choices the user made.
"""

import pytest

import media
import texts
import worker
from models import Generation
from tests.helpers import buttons, png

MODES = list(media.MODE_SPECS)


def opening(key: str) -> str:
    """The fixed start of a Russian text: what a reply must begin with (values come later)."""
    return texts.TEXTS[key]["ru"].split("{")[0].strip()[:25]


@pytest.mark.parametrize("mode", MODES)
def test_the_bot_asks_what_the_mode_table_says_in_its_order(app, fake_fal, mode):
    spec = media.MODE_SPECS[mode]
    app.send("/start")
    [reply] = app.press("mode:" + mode)
    if spec.consent_key:
        assert reply["text"].startswith(opening(spec.consent_key))
        [reply] = app.press("consent")
    for n in range(spec.min_images):
        key = spec.image_keys[min(n, len(spec.image_keys) - 1)]
        if n == 0 or spec.min_images == spec.max_images:       # a collecting mode counts instead
            assert reply["text"].startswith(opening(key)), (n, reply["text"])
        [reply] = app.photo(png(200 + n, 200))
    if spec.min_images < spec.max_images:
        assert "done" in buttons(reply)
        [reply] = app.press("done")
    if spec.needs_prompt or spec.needs_text:
        assert reply["text"].startswith(opening(spec.input_key)), reply["text"]
        [reply] = app.send("слово")
    chosen = {}
    for option in spec.options:
        assert reply["text"] == texts.t(option.ask_key)
        assert buttons(reply) == ["%s:%s" % (option.button, c) for c in option.choices] + ["cancel"]
        chosen[option.name] = option.choices[-1]
        [reply] = app.press("%s:%s" % (option.button, option.choices[-1]))
    if spec.local:
        assert reply.get("photo") and Generation.select().count() == 0
        return
    assert reply["text"].startswith(opening("job_queued"))
    gen = Generation.get()
    assert (gen.mode, dict(gen.options or {}), len(gen.input_file_ids)) == (mode, chosen, spec.min_images)
    assert gen.prompt == ("слово" if spec.needs_prompt else None)
    assert app.run_jobs() == 1 and Generation.get().status == "delivered"


def test_an_option_the_mode_does_not_have_is_refused_by_the_worker():
    """The worker accepts exactly the table's options and choices (one validation for both)."""
    generate = media.MODE_SPECS["generate"]
    assert worker._check_options("generate", {"aspect_ratio": generate.options[0].choices[-1]})
    with pytest.raises(worker.InvalidOptions):
        worker._check_options("generate", {"aspect_ratio": "5:1"})
    with pytest.raises(worker.InvalidOptions):
        worker._check_options("upscale", {"aspect_ratio": "1:1"})


def test_a_button_shown_by_the_old_per_mode_flow_still_works_after_the_upgrade(app, database):
    """A chat at the old "ratio" step when the new release starts: migration 0007 carries its
    state over, and the aspect-ratio button already on the screen queues the job."""
    import importlib.util

    from models import ConversationState
    app.send("/start")
    app.press("mode:generate")
    [ask] = app.send("маяк")
    row = ConversationState.get()
    old = {k: v for k, v in row.data.items() if k not in ("input", "option", "chosen")}
    ConversationState.update(state="Step:ratio", data=dict(old, prompt="маяк")).execute()
    spec = importlib.util.spec_from_file_location("m0007", "migrations/0007_mode_flow_states.py")
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    migration.up(None, database)
    assert ConversationState.get().state == "Step:option"
    [queued] = app.press("ratio:4:3", message=ask)
    assert queued["text"].startswith(opening("job_queued"))
    gen = Generation.get()
    assert (gen.prompt, gen.options) == ("маяк", {"aspect_ratio": "4:3"})
