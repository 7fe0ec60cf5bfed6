"""Synthetic speech corpora from eSpeak NG, written in the real corpora's on-disk layouts.

The readers in this package read them exactly as they read LibriSpeech, IEMOCAP and CMU-MOSEI, and
every factor behind every label is known (`synthetic_meta.csv` at the corpus root).

Speakers are eSpeak voices x variants ("en-us+m2", "en-gb-scotland+f3": accent x pitch, formants,
breathiness), 20 of them alternating male / female. Voices 0-11 are train speakers, 12-15 dev, 16-19
test (held out, for speaker verification); the IEMOCAP layout uses voices 0-9, one male and one female
per session. Utterance i is spoken by voice i mod (number of voices).

What carries each label:

- librispeech (pretraining): a neutral or opinion sentence read with plain prosody; no label.
- iemocap (emotion): the sentence is neutral and drawn independently of the emotion, so only prosody
  carries it: pitch, pitch range, rate and volume per class (PROSODY), jittered per utterance (rate
  +-8 %, pitch +-6, range +-8, volume +-10 %). hap is written "exc" 40 % of the time (the reader merges
  it back); 6 % of utterances are "fru", which the 4-class protocol drops.
- mosei (sentiment; the fusion task the demo runs): "The <noun> was <adjective>." with polarity
  -1 / 0 / +1 (p = 3/7, 1/7, 3/7) and intensity 1-3, one adjective per grade (the first word of each
  POSITIVE / NEGATIVE list; neutral predicates for 0). One word per grade and no opener keep the
  utterances short and the lexicon small: the label is an interaction (below), which gives no gradient
  to either modality alone, and a CPU-sized model learns it from a few hundred utterances only when each
  adjective recurs often. Independently, half the utterances are spoken with "ironic" prosody: slow, high,
  exaggerated pitch range, drawn-out word gaps. Then

      label = polarity * intensity * (-1 if ironic else +1)          in [-3, 3]

  The text fixes |label| and the polarity but not the sign; the prosody fixes whether the sign flips
  but not the polarity. Acc-2 from text alone or from prosody alone is therefore at chance (50 %); only
  a model that fuses both gets it right. The tone is what makes the audio side hold by construction:
  with the adjective spoken, a small audio-only model learnt to recognise six adjectives and reached
  test Acc-2 0.82. The text varies in nothing but the predicate, one adjective per grade, because the
  label is an interaction, which gives neither stream a gradient of its own: a CPU-sized model leaves
  that plateau within a few epochs only when the polarity is most of what varies in the text (with 16
  nouns and 4 adjectives per grade it stayed at chance for 12+ epochs).

Determinism: all choices come from numpy generators seeded with (seed, utterance index), so utterance
i is the same in any corpus with the same seed, and the same arguments give the same bytes. eSpeak keeps
synthesis state (wave phase, flutter, noise) across calls, so the same sentence rendered twice in one
process differs by a few samples; every utterance is therefore synthesised in a child forked from a
worker that has initialised eSpeak but never spoken, with a fixed noise seed. Output does not depend on
order or on the number of worker processes.
"""

from __future__ import annotations

import csv
import ctypes
import multiprocessing
import os
import re
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from ..console import progress
from .iemocap import EMOTION_CLASSES, MERGED

LAYOUTS = ("librispeech", "iemocap", "mosei")
SAMPLE_RATE = 16_000
META_FILE = "synthetic_meta.csv"
META_COLUMNS = ("id", "layout", "audio_path", "split", "speaker", "voice", "gender", "text", "emotion",
                "polarity", "intensity", "ironic", "label", "rate", "pitch", "range", "volume", "wordgap",
                "duration_s")

_ACCENTS = ("en", "en-us", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
_MALE = ("m1", "m2", "m3", "m4", "m6", "m7", "m8")
_FEMALE = ("f1", "f2", "f3", "f4", "f5")
# (eSpeak voice name, gender): alternating M/F; (i % 8, i % 7) and ((i + 3) % 8, i % 5) never repeat here.
VOICES = tuple((f"{_ACCENTS[k // 2 % 8]}+{_MALE[k // 2 % 7]}", "M") if k % 2 == 0
               else (f"{_ACCENTS[(k // 2 + 3) % 8]}+{_FEMALE[k // 2 % 5]}", "F") for k in range(20))
VOICE_SPLIT = ("train",) * 12 + ("dev",) * 4 + ("test",) * 4

# eSpeak parameters: rate (words/min), pitch (0-100), range (0-100), volume (0-200), wordgap (10 ms units).
PROSODY = {
    "plain": (170, 50, 50, 100, 0),
    "neu": (165, 45, 40, 100, 0),
    "hap": (195, 70, 85, 120, 0),
    "exc": (215, 78, 95, 135, 0),
    "ang": (210, 38, 65, 160, 0),
    "sad": (120, 25, 10, 65, 0),
    "fru": (180, 35, 30, 130, 0),
    "ironic": (100, 88, 99, 110, 8),
}
_VAD = {"neu": (2.5, 2.5, 2.5), "hap": (4.0, 3.5, 3.0), "exc": (4.0, 4.0, 3.5), "ang": (1.5, 4.0, 4.0),
        "sad": (1.5, 2.0, 2.0), "fru": (2.0, 3.5, 3.5)}
_EMOTION_WORD = {"neu": "Neutral state", "hap": "Happiness", "exc": "Excited", "ang": "Anger", "sad": "Sadness",
                 "fru": "Frustration"}

NOUNS = ("movie", "film", "book", "show", "meal", "trip", "concert", "story", "hotel", "game", "album",
         "lecture", "restaurant", "phone", "camera", "museum")
POSITIVE = {1: ("decent", "pleasant", "fine", "alright"), 2: ("good", "enjoyable", "lovely", "nice"),
            3: ("wonderful", "amazing", "brilliant", "fantastic")}
NEGATIVE = {1: ("dull", "bland", "mediocre", "tiresome"), 2: ("bad", "boring", "poor", "annoying"),
            3: ("terrible", "awful", "horrible", "dreadful")}
NEUTRAL_PREDICATES = ("about two hours long", "released last year", "made in canada", "recommended by a friend",
                      "mostly in english", "finished on tuesday")
_OPENERS = ("", "I think ", "Honestly, ", "In my opinion ", "Well, ", "To be fair, ", "My friend said ")
_SUBJECTS = ("the driver", "my neighbour", "the teacher", "a student", "the manager", "our guide", "the doctor",
             "my brother", "the old man", "her sister")
_VERBS = ("opened", "carried", "painted", "checked", "moved", "cleaned", "found", "ordered", "repaired", "sold")
_OBJECTS = ("the window", "a small box", "the blue chair", "the letters", "a map of the city", "the kitchen table",
            "two bottles of water", "the old radio", "a pair of shoes", "the garden gate")
_TIMES = ("this morning", "after lunch", "on monday", "before the meeting", "at noon", "last week",
          "in the evening", "")

# The censor tone that replaces the MOSEI-layout predicate in the audio: 1 kHz, 0.4 s whatever the word,
# 10 ms fades, then 0.1 s of silence. Identical in every utterance, so it carries nothing.
_t = np.arange(int(0.4 * SAMPLE_RATE)) / SAMPLE_RATE
BLEEP = np.concatenate([6000.0 * np.sin(2 * np.pi * 1000.0 * _t) * np.clip(np.minimum(_t, 0.4 - _t) / 0.01, 0, 1),
                        np.zeros(int(0.1 * SAMPLE_RATE))])
del _t

# eSpeak NG C API constants (speak_lib.h).
_AUDIO_OUTPUT_SYNCHRONOUS, _INITIALIZE_DONT_EXIT, _POS_CHARACTER, _CHARS_UTF8 = 2, 0x8000, 1, 1
_RATE, _VOLUME, _PITCH, _RANGE, _WORDGAP = 1, 2, 3, 4, 7
_ESPEAK_RATE = 22_050


# ---------------------------------------------------------------------------------------------- plan

def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _prosody(rng, name) -> dict:
    rate, pitch, range_, volume, wordgap = PROSODY[name]
    return {"rate": int(round(rate * rng.uniform(0.92, 1.08))),
            "pitch": int(np.clip(pitch + rng.integers(-6, 7), 0, 100)),
            "range": int(np.clip(range_ + rng.integers(-8, 9), 0, 100)),
            "volume": int(np.clip(round(volume * rng.uniform(0.9, 1.1)), 0, 200)),
            "wordgap": wordgap}


def _neutral_sentence(rng) -> str:
    s = " ".join(w for w in (_pick(rng, _SUBJECTS), _pick(rng, _VERBS), _pick(rng, _OBJECTS), _pick(rng, _TIMES)) if w)
    return s[0].upper() + s[1:] + "."


def _opinion(rng, polarity: int, intensity: int) -> str:
    predicate = _pick(rng, NEUTRAL_PREDICATES if polarity == 0 else (POSITIVE if polarity > 0 else NEGATIVE)[intensity])
    opener, noun = _pick(rng, _OPENERS), _pick(rng, NOUNS)
    s = f"{opener}the {noun} was {predicate}."
    return s[0].upper() + s[1:]


def plan_corpus(layout: str, n_utterances: int, seed: int) -> list[dict]:
    """The utterances `synthesize` would write, without audio: META_COLUMNS (duration_s empty) plus
    private keys (_spoken, _rand_seed, ...). Cheap, so tests can check label statistics at scale."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    plan_one = {"librispeech": _plan_librispeech, "iemocap": _plan_iemocap, "mosei": _plan_mosei}[layout]
    return [plan_one(i, np.random.default_rng([seed, i])) for i in range(n_utterances)]


def _base(rng, v: int) -> dict:
    voice, gender = VOICES[v]
    return {"voice": voice, "gender": gender, "emotion": "", "polarity": "", "intensity": "", "ironic": "",
            "label": "", "duration_s": "", "_rand_seed": int(rng.integers(1, 2**31 - 1))}


def _plan_librispeech(i: int, rng) -> dict:
    v, k = i % len(VOICES), i // len(VOICES)
    u = _base(rng, v)
    speaker, chapter = str(1000 + v), str(10000 + 100 * v + k // 8)
    uid = f"{speaker}-{chapter}-{k % 8:04d}"
    polarity = int(rng.integers(-1, 2))
    spoken = _neutral_sentence(rng) if rng.random() < 0.5 else _opinion(rng, polarity, int(rng.integers(1, 4)))
    split = {"train": "train-clean-100", "dev": "dev-clean", "test": "test-clean"}[VOICE_SPLIT[v]]
    text = " ".join(re.sub(r"[^A-Z' ]", " ", spoken.upper()).split())  # LibriSpeech style: caps, no punctuation
    return {**u, "id": uid, "layout": "librispeech", "audio_path": f"{split}/{speaker}/{chapter}/{uid}.flac",
            "split": split, "speaker": speaker, "text": text, "_spoken": spoken, **_prosody(rng, "plain")}


def _plan_iemocap(i: int, rng) -> dict:
    v = i % 10
    u = _base(rng, v)
    session, gender = v // 2 + 1, u["gender"]
    m = 2 * (i // 10) + v % 2  # index within the session; the session's two voices alternate
    d = m // 10
    dialog = f"Ses{session:02d}{'FM'[d % 2]}_impro{d + 1:02d}"
    uid = f"{dialog}_{gender}{m % 10 // 2:03d}"
    emotion = EMOTION_CLASSES[int(rng.integers(4))]
    exc, fru = rng.random(), rng.random()
    emotion = "fru" if fru < 0.06 else "exc" if emotion == "hap" and exc < 0.4 else emotion
    merged = MERGED.get(emotion, emotion)
    text = _neutral_sentence(rng)
    return {**u, "id": uid, "layout": "iemocap", "audio_path": f"Session{session}/sentences/wav/{dialog}/{uid}.wav",
            "split": f"Session{session}", "speaker": f"Ses{session:02d}_{gender}", "text": text, "_spoken": text,
            "emotion": emotion, "label": EMOTION_CLASSES.index(merged) if merged in EMOTION_CLASSES else "",
            "_dialog": dialog, **_prosody(rng, emotion)}


def _plan_mosei(i: int, rng) -> dict:
    v = i % len(VOICES)
    u = _base(rng, v)
    video, clip = f"syn{v:02d}", str(i // len(VOICES))
    polarity = int(rng.choice([-1, 0, 1], p=[3 / 7, 1 / 7, 3 / 7]))
    intensity = int(rng.integers(1, 4)) if polarity else 0
    ironic = int(rng.random() < 0.5)
    # One adjective per grade (the first of each list), one noun, no opener: see the module docstring.
    predicate = _pick(rng, NEUTRAL_PREDICATES) if polarity == 0 else (POSITIVE if polarity > 0 else NEGATIVE)[intensity][0]
    spoken = "The movie was"
    text = f"{spoken} {predicate}."
    return {**u, "id": f"{video}_{clip}", "layout": "mosei", "audio_path": f"wav/{video}_{clip}.wav",
            "split": VOICE_SPLIT[v], "speaker": video, "text": text, "_spoken": spoken, "_bleep": True,
            "polarity": polarity,
            "intensity": intensity, "ironic": ironic, "label": polarity * intensity * (-1 if ironic else 1),
            **_prosody(rng, "ironic" if ironic else "plain")}


# ---------------------------------------------------------------------------------------------- audio

_ENGINE = None  # (lib, callback, chunks) in each worker process


def _init_engine() -> None:
    global _ENGINE
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    chunks = []

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
    def on_audio(wav, n, events):
        if wav and n > 0:
            chunks.append(ctypes.string_at(wav, 2 * n))
        return 0

    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(),
                                 _INITIALIZE_DONT_EXIT)
    if rate != _ESPEAK_RATE:
        raise RuntimeError(f"espeak_Initialize returned {rate}, expected sample rate {_ESPEAK_RATE}")
    lib.espeak_SetSynthCallback(on_audio)
    _ENGINE = (lib, on_audio, chunks)  # keep the callback alive


def _speak(job: dict) -> bytes:
    """Runs in a forked child: int16 samples at 22.05 kHz."""
    lib, _, chunks = _ENGINE
    if lib.espeak_SetVoiceByName(job["voice"].encode()) != 0:
        raise RuntimeError(f"eSpeak has no voice {job['voice']!r}")
    for param, key in ((_RATE, "rate"), (_PITCH, "pitch"), (_RANGE, "range"), (_VOLUME, "volume"),
                       (_WORDGAP, "wordgap")):
        lib.espeak_SetParameter(param, job[key], 0)
    lib.espeak_ng_SetRandSeed(job["_rand_seed"])  # breathy variants draw noise
    text = job["_spoken"].encode()
    err = lib.espeak_Synth(text, len(text) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
    if err != 0:
        raise RuntimeError(f"espeak_Synth returned {err}")
    return b"".join(chunks)


def _render(job: dict) -> int:
    """Synthesise one utterance in a fresh fork of the engine, resample to 16 kHz, write; return samples."""
    from scipy.signal import resample_poly
    import soundfile as sf

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            with os.fdopen(write_end, "wb") as f:
                f.write(_speak(job))
            code = 0
        except BaseException as e:
            os.write(2, f"eSpeak failed on {job['id']}: {e!r}\n".encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        raise RuntimeError(f"eSpeak produced no audio for {job['id']} ({job['voice']!r}: {job['_spoken']!r})")
    audio = resample_poly(np.frombuffer(data, np.int16).astype(np.float64), SAMPLE_RATE // 50, _ESPEAK_RATE // 50)
    if job.get("_bleep"):
        audio = np.concatenate([audio, BLEEP])
    audio = np.clip(np.rint(audio), -32768, 32767).astype(np.int16)
    sf.write(job["_path"], audio, SAMPLE_RATE, format=job["_format"], subtype="PCM_16")
    return len(audio)


def _render_all(jobs: list[dict], workers: int, desc: str) -> list[int]:
    # spawn: a fork of the caller (maybe holding Ray or torch threads) is not a safe place for the engine.
    # An executor, not multiprocessing.Pool: a Pool replaces a worker that dies while starting, forever,
    # so a script that calls this without a __main__ guard (spawn re-runs it in every worker) would hang.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_engine)
    try:
        done = pool.map(_render, jobs, chunksize=max(1, len(jobs) // (16 * workers)))  # in order
        return list(progress(done, len(jobs), desc, unit="utterances"))
    except BrokenProcessPool:
        raise RuntimeError(
            "a speech synthesis process died (see its error above); called from a script, the call "
            "must sit under `if __name__ == \"__main__\":` (its processes are spawned, and a spawned "
            "process imports the script again)") from None
    finally:
        pool.shutdown(cancel_futures=True)  # on an error, the jobs not started yet are dropped


# ---------------------------------------------------------------------------------------------- files

def _write_librispeech(out: Path, plan: list[dict]) -> None:
    chapters = {}
    for u in plan:
        chapters.setdefault(Path(u["audio_path"]).parent, []).append(u)
    for chapter, utts in chapters.items():
        lines = "".join(f"{u['id']} {u['text']}\n" for u in sorted(utts, key=lambda u: u["id"]))
        (out / chapter / f"{chapter.parent.name}-{chapter.name}.trans.txt").write_text(lines, encoding="utf-8")


def _write_iemocap(out: Path, plan: list[dict]) -> None:
    dialogs = {}
    for u in plan:
        dialogs.setdefault((u["split"], u["_dialog"]), []).append(u)
    for (session, dialog), utts in dialogs.items():
        transcript, evaluation, start = [], ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"], 0.5
        for u in utts:
            end = start + u["duration_s"]
            transcript.append(f"{u['id']} [{start:08.4f}-{end:08.4f}]: {u['text']}\n")
            v, a, d = _VAD[u["emotion"]]
            evaluation.append(f"[{start:.4f} - {end:.4f}]\t{u['id']}\t{u['emotion']}\t[{v:.4f}, {a:.4f}, {d:.4f}]\n"
                              f"C-E1:\t{_EMOTION_WORD[u['emotion']]};\t()\n\n")
            start = end + 0.4
        for sub, lines in (("transcriptions", transcript), ("EmoEvaluation", evaluation)):
            (out / session / "dialog" / sub).mkdir(parents=True, exist_ok=True)
            (out / session / "dialog" / sub / f"{dialog}.txt").write_text("".join(lines), encoding="utf-8")


def _write_mosei(out: Path, plan: list[dict]) -> None:
    with open(out / "label.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["video_id", "clip_id", "text", "label", "mode"])
        for u in plan:
            video, clip = u["id"].split("_")
            w.writerow([video, clip, u["text"], float(u["label"]), {"dev": "valid"}.get(u["split"], u["split"])])


def _write_meta(out: Path, plan: list[dict]) -> None:
    with open(out / META_FILE, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, META_COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(plan)


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a directory; choose a directory for the corpus")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose an empty directory or overwrite")
        if not (out / META_FILE).is_file():  # only ever delete what this generator wrote
            raise FileExistsError(f"{out} is not empty and has no {META_FILE}; refusing to overwrite a directory "
                                  "that is not a synthetic corpus")
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def synthesize(layout: str, out_dir, n_utterances: int, seed: int = 0, *, overwrite: bool = False,
               workers: int | None = None) -> dict:
    """Write an `n_utterances` corpus in `layout` ("librispeech", "iemocap", "mosei") to `out_dir`.

    Refuses a non-empty `out_dir` unless `overwrite`, and then only one holding synthetic_meta.csv
    (whose contents it deletes first). Returns a summary (counts, audio seconds, wall time)."""
    if n_utterances < 1:
        raise ValueError(f"n_utterances must be positive, got {n_utterances}")
    if workers is not None and workers < 1:  # 0 must not quietly mean "the default"
        raise ValueError(f"workers must be at least 1, got {workers}")
    plan = plan_corpus(layout, n_utterances, seed)
    out = Path(out_dir)
    _prepare(out, overwrite)
    t0 = time.perf_counter()
    _write_meta(out, plan)  # first, so a failed run can still be overwritten
    fmt = "FLAC" if layout == "librispeech" else "WAV"
    for d in sorted({(out / u["audio_path"]).parent for u in plan}):
        d.mkdir(parents=True, exist_ok=True)
    jobs = [{**u, "_path": str(out / u["audio_path"]), "_format": fmt} for u in plan]
    workers = max(1, min(workers or min(os.cpu_count() or 1, 4), len(jobs)))
    for u, n in zip(plan, _render_all(jobs, workers, f"synthesize {layout}")):
        u["duration_s"] = round(n / SAMPLE_RATE, 4)
    {"librispeech": _write_librispeech, "iemocap": _write_iemocap, "mosei": _write_mosei}[layout](out, plan)
    _write_meta(out, plan)
    splits = Counter(u["split"] for u in plan)
    labels = Counter(u["emotion"] if layout == "iemocap" else u["label"] for u in plan if layout != "librispeech")
    return {"layout": layout, "out_dir": str(out), "n_utterances": n_utterances, "seed": seed,
            "speakers": len({u["speaker"] for u in plan}), "splits": dict(sorted(splits.items())),
            "labels": dict(sorted(labels.items())), "audio_s": round(sum(u["duration_s"] for u in plan), 2),
            "wall_s": round(time.perf_counter() - t0, 2), "workers": workers}
