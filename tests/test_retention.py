"""Conversation states and once-only keys stop growing (issue 13 §3): the sweeper deletes those
idle for STATE_RETENTION_DAYS, by index, and what it forgets is safe to forget."""
import datetime

import config
import worker
from models import AdminAction, ConversationState, utcnow
from tests.helpers import USER


def test_the_sweeper_forgets_idle_chats_and_old_keys_and_keeps_the_rest(app):
    cfg = config.get()
    app.send("/start")
    app.press("mode:generate")                                     # a chat in a flow, active now
    now = utcnow()
    old = now - datetime.timedelta(days=cfg.state_retention_days, seconds=1)
    ConversationState.create(key="medialab:1:2:2", state=None, data={"face_swap_consent": True}, updated_at=old)
    AdminAction.create(key="tap:again:old", created_at=old)
    AdminAction.create(key="tap:again:new", created_at=now)
    report = worker.sweep_once(now=now)
    assert report["pruned"] == 2
    kept = [s.key for s in ConversationState.select()]
    assert len(kept) == 1 and "medialab:1:2:2" not in kept                # the active chat stays
    assert [a.key for a in AdminAction.select()] == ["tap:again:new"]
    assert worker.sweep_once(now=now)["pruned"] == 0


def test_a_button_of_a_forgotten_flow_says_it_is_no_longer_active(app):
    app.send("/start")
    app.press("mode:generate")
    [ratio] = app.send("маяк")
    later = utcnow() + datetime.timedelta(days=config.get().state_retention_days, seconds=1)
    assert worker.sweep_once(now=later)["pruned"] >= 1
    assert ConversationState.select().count() == 0
    assert app.press("ratio:1:1", message=ratio) == []
    answer = app.fake.calls("answerCallbackQuery")[-1].params
    assert "не действует" in answer["text"]
    assert app.send("/start", user=USER)                           # the chat starts afresh


def test_zero_keeps_everything(app):
    config.configure(config.get().replace(state_retention_days=0))
    AdminAction.create(key="x", created_at=utcnow() - datetime.timedelta(days=3650))
    assert worker.sweep_once(now=utcnow())["pruned"] == 0
    assert AdminAction.select().count() == 1
