"""Built-in task suite: correct answers, deterministic and disjoint splits, tokenizer round trip."""

import pytest

from premoe.core.tasks import TASKS, char_tokenizer, samples, split_of


@pytest.mark.parametrize("task", sorted(TASKS))
def test_answers_are_correct(task):
    for s in samples(task, 50, "eval"):
        p, c = s["prompt"], s["completion"]
        arg = p[len(task) + 1 : -1]
        if task == "add":
            a, b = map(int, arg.split("+"))
            assert c == str(a + b)
        elif task == "reverse":
            assert c == arg[::-1]
        elif task == "shift":
            assert c == "".join(chr((ord(ch) - 97 + 1) % 26 + 97) for ch in arg)
        elif task == "count":
            letter, word = arg.split(" in ")
            assert c == str(word.count(letter))
        elif task == "sort":
            assert c == "".join(sorted(arg))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_splits_are_deterministic_and_disjoint(task):
    ev = samples(task, 100, "eval")
    assert ev == samples(task, 100, "eval")
    cal = samples(task, 100, "calib")
    assert not {s["prompt"] for s in ev} & {s["prompt"] for s in cal}
    assert all(split_of(s["prompt"]) == "eval" for s in ev)
    assert len({s["prompt"] for s in ev}) == 100


def test_tokenizer_round_trip_and_bos(tmp_path):
    tok = char_tokenizer()
    ids = tok("count a in abca=2").input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len("count a in abca=2")
    assert tok.decode(ids, skip_special_tokens=True) == "count a in abca=2"
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("sort 321=").input_ids == tok("sort 321=").input_ids
