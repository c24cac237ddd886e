#!/usr/bin/env bash
# The paper-scale cluster path, rehearsed on this machine without a cluster, a GPU or the network:
#   local SlimPajama-schema files + a local tokenizer folder -> make prepare -> the Table 2 sweep submitted
#   to a fake SLURM (sbatch / squeue / sacct that record what they get) -> --status -> --collect.
# Nothing is trained. What it prints is what a researcher sees on a login node; the submitted scripts and
# their dependencies are in $WORK/bin/sbatch.log and $WORK/runs/slurm/.
#   bash experiments/cluster_rehearsal.sh [WORK=/tmp/aioli_rehearsal]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-/tmp/aioli_rehearsal}
rm -rf "$WORK" && mkdir -p "$WORK/bin/scripts"

# 1. seven groups of SlimPajama-schema jsonl (text + meta.redpajama_set_name) and a BPE tokenizer folder
"$PY" - "$WORK" <<'EOF'
import json, random, sys
from pathlib import Path
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

work = Path(sys.argv[1])
names = {"arxiv": "RedPajamaArXiv", "book": "RedPajamaBook", "c4": "RedPajamaC4",
         "commoncrawl": "RedPajamaCommonCrawl", "github": "RedPajamaGithub",
         "stackexchange": "RedPajamaStackExchange", "wikipedia": "RedPajamaWikipedia"}
rng = random.Random(0)
texts = []
for split, n in (("train", 60), ("validation", 12), ("test", 12)):
    rows = []
    for g, set_name in names.items():
        words = [f"{g[:3]}{i}" for i in range(40)] + ["the", "of", "and", "a"]
        for _ in range(n):
            doc = " ".join(rng.choice(words) for _ in range(rng.randint(300, 900)))
            rows.append({"text": doc, "meta": {"redpajama_set_name": set_name}})
            texts.append(doc)
    (work / "sp" / split).mkdir(parents=True)
    with open(work / "sp" / split / "data.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
tok = Tokenizer(models.BPE(unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "[UNK]"]))
PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="[UNK]").save_pretrained(
    str(work / "tok"))
EOF

# 2. a fake SLURM first on PATH
cat > "$WORK/bin/sbatch" <<'EOF'
#!/bin/bash
d="$(cd "$(dirname "$0")" && pwd)"; n=$(( $(cat "$d/next_id") + 1 )); echo "$n" > "$d/next_id"
{ printf '%s' "$n"; printf '\t%s' "$@"; printf '\n'; } >> "$d/sbatch.log"; cp "${@: -1}" "$d/scripts/$n.sbatch"; echo "$n"
EOF
cat > "$WORK/bin/squeue" <<'EOF'
#!/bin/bash
# every job submitted so far is still waiting for a node
d="$(cd "$(dirname "$0")" && pwd)"; cut -f1 "$d/sbatch.log" 2>/dev/null | sed 's/$/ PENDING/'
EOF
printf '#!/bin/bash\nexit 0\n' > "$WORK/bin/sacct"
echo 1000 > "$WORK/bin/next_id"
chmod +x "$WORK/bin/sbatch" "$WORK/bin/squeue" "$WORK/bin/sacct"

DATA="data=slimpajama data.source.path=$WORK/sp data.tokenizer=$WORK/tok cache_dir=$WORK/cache"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
echo "== make prepare"
make -s prepare ARGS="--workers 2 scale=paper groups=slimpajama_all $DATA"
echo "== submit"
PATH="$WORK/bin:$PATH" make -s reproduce-table2 SCALE=paper \
  ARGS="--launcher slurm --results-dir $WORK/runs --out-dir $WORK/out $DATA hydra.launcher.partition=gpu"
echo "== status"
PATH="$WORK/bin:$PATH" make -s reproduce-table2 SCALE=paper ARGS="--status --results-dir $WORK/runs $DATA" | tail -4
echo "== collect"
PATH="$WORK/bin:$PATH" make -s reproduce-table2 SCALE=paper ARGS="--collect --results-dir $WORK/runs $DATA" | tail -2
echo "== what SLURM got"
echo "$(wc -l < "$WORK/bin/sbatch.log") sbatch calls, $(grep -c -- '--dependency=afterok' "$WORK/bin/sbatch.log" || true) with --dependency=afterok"
