# Source on the GPU machine (see lab/device/device_stage.py): join staged pieces, install carried
# wheels, set PYTHONPATH / DARTQUANT_CACHE. Safe to source when nothing was staged.
#
# .whl (git-ignored) holds wheels for Python 3.12 that the device image lacks: gguf, lm-eval,
# datasets, evaluate, dill, multiprocess, pytablewriter (+ dataproperty, mbstrdecoder,
# pathvalidate, tabledata, tcolorpy, typepy, chardet), rouge-score, nltk, sqlitedict,
# word2number, more-itertools. Fill it here with `pip download --no-deps --only-binary=:all:
# --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform any -d .whl NAME`
# (sdists: `pip wheel --no-deps -w .whl FILE`).
export PYTHONUNBUFFERED=1
export DARTQUANT_CACHE=/tmp/dqcache DARTQUANT_NO_INSTALL=1 HF_HUB_OFFLINE=1
# each pack (device_stage.py pack --name NAME -> NAME.tar.000, ...) is unpacked once, when sourced
for pack in $(ls /tmp/dqstage/*.tar.* 2>/dev/null | sed 's|.*/||; s|\.tar\.[0-9]*$||' | sort -u); do
  if [ ! -f "/tmp/dqcache/.staged-$pack" ]; then
    mkdir -p /tmp/dqcache && cat /tmp/dqstage/"$pack".tar.* | tar -x -C /tmp/dqcache && touch "/tmp/dqcache/.staged-$pack"
  fi
done
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.done
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}:/tmp/site"
