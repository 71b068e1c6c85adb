"""One flow for every mode (issue 10 §4): the bot's per-mode states ``Step:ratio``,
``Step:text``, ``Step:position`` and ``Step:color`` (pyTelegramBotAPI names a state
"<group>:<name>") became ``Step:prompt`` (the typed input) and ``Step:option`` (data["option"]
names the option asked, data["input"] the typed input, data["chosen"] the options chosen).

Chats in the middle of such a step when the new release starts are carried over, so the
buttons already on their screens keep working (the callback data and flow tokens are unchanged).
No schema change.
"""
import json

from peewee import *

OLD_STATES = ('Step:ratio', 'Step:text', 'Step:position', 'Step:color')


def _carry(state, data):
    """The new (state, data) of a conversation in old step `state` (data: the old data dict)."""
    if state == 'Step:text':
        return 'Step:prompt', data
    if state == 'Step:ratio':
        data.update(input=data.pop('prompt', None), option='aspect_ratio', chosen={})
    elif state == 'Step:position':
        data.update(input=data.pop('text', None), option='position', chosen={})
    else:                                                   # 'color': the position is chosen
        data.update(input=data.pop('text', None), option='color', chosen={'position': data.pop('position', None)})
    return 'Step:option', data


def up(migrator, db):
    mark = '%s' if isinstance(db, PostgresqlDatabase) else '?'
    rows = db.execute_sql('SELECT key, state, data FROM conversation_state WHERE state IN (%s)'
                          % ', '.join([mark] * len(OLD_STATES)), OLD_STATES).fetchall()
    for key, state, data in rows:
        data = json.loads(data) if isinstance(data, str) else dict(data or {})
        state, data = _carry(state, data)
        db.execute_sql('UPDATE conversation_state SET state = %s, data = %s WHERE key = %s' % (mark, mark, mark),
                       (state, json.dumps(data), key))


def down(migrator, db):
    pass                                                    # the old release reads the new steps as stray input
