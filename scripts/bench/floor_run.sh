#!/usr/bin/env bash
# The floor of the per-run overhead benchmark (docs/PERFORMANCE.md, "Per-run overhead"): one
# run done by a plain shell script, with the same steps the runner takes and nothing else —
# claim, git fetch into a bare cache, clone to the checkout, `docker run` of the agent image
# with the prompt on stdin until `session_idle`, push of the run branch through the git proxy,
# one HTTP POST of the result. No journal, no retries, no sandbox flags beyond --network none.
# Driven by examples/overhead_bench.rs; usage: floor_run.sh API_URL CREDENTIAL CACHE_DIR IMAGE
set -euo pipefail
api=$1 cred=$2 cache=$3 image=$4
export GIT_CONFIG_GLOBAL=/dev/null GIT_TERMINAL_PROMPT=0

job=$(curl -sf -X POST -H "Authorization: Bearer $cred" "$api/runner/claim")
run_id=$(jq -r .job.run_id <<<"$job")
[ "$run_id" != null ] || { echo "floor_run: no job" >&2; exit 1; }
token=$(jq -r .job.env.WS_TOKEN <<<"$job")
slug=$(jq -r '.job.repos[0].slug' <<<"$job")
ws=$(jq -r '.job.repos[0].workspace_id' <<<"$job")
base=$(jq -r '.job.repos[0].base_ref // "main"' <<<"$job")
prompt=$(jq -c '{type: "prompt", message: .job.initial_prompt}' <<<"$job")
url="$api/git-proxy/$ws/$slug"
auth="http.extraHeader=Authorization: Bearer $token"
branch="agent-runs/run-$run_id"

bare="$cache/$slug.git"
if [ -d "$bare" ]; then
  git -c "$auth" --git-dir "$bare" fetch -q "$url" "+refs/heads/$base:refs/heads/$base"
else
  mkdir -p "$(dirname "$bare")"
  git -c "$auth" clone -q --bare "$url" "$bare"
fi
checkout="$cache/runs/$run_id"
rm -rf "$checkout"
mkdir -p "$cache/runs"
git clone -q --no-hardlinks "$bare" "$checkout"
git -C "$checkout" checkout -q -b "$branch" "$base"
base_commit=$(git -C "$checkout" rev-parse HEAD)
chown -R 1000:1000 "$checkout"

coproc AGENT { docker run -i --rm --network none -v "$checkout:/workspace" "$image"; }
agent_pid=$AGENT_PID
echo "$prompt" >&"${AGENT[1]}"
while IFS= read -r line <&"${AGENT[0]}"; do
  [[ $line == *'"session_idle"'* ]] && break
done
agent_in=${AGENT[1]}
exec {agent_in}>&-
wait "$agent_pid" || true

git -c safe.directory="*" -c "$auth" -C "$checkout" push -q "$url" "HEAD:refs/heads/$branch"
curl -sf -X POST -H "Authorization: Bearer $cred" -H 'Content-Type: application/json' \
  -d "{\"status\":\"succeeded\",\"summary\":\"noop\",\"branch\":\"$branch\",\"base_commit\":\"$base_commit\"}" \
  "$api/runner/runs/$run_id/result" >/dev/null
rm -rf "$checkout"
echo "$run_id"
