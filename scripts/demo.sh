#!/usr/bin/env bash
# The demo: start a small live process tree, checkpoint it with pycr, show the
# images, restore it, and watch it go on counting from where it stopped; then
# migrate it live into a replica in a new PID namespace.
# Works on a fresh machine (root, Python 3.11, gcc, apt): it sets itself up first.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
pycr="$repo/.venv/bin/pycr"

work="$(mktemp -d /tmp/pycr-demo.XXXXXX)"
tree_pid=""
cleanup() {
    # Kill what the demo started, by PID: the original tree and the restored one.
    for pid in $tree_pid $(cat "$work/restored.pids" 2>/dev/null | tr ' ' '\n' | tac); do
        pkill -KILL -P "$pid" 2>/dev/null || true
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

gcc -O2 -o "$work/counter_tree" "$repo/examples/counter_tree.c"
cd "$work"
# Start the tree in its own session with only fds 0-2 (nothing inherited from this shell).
tree_pid=$("$repo/.venv/bin/python" -c '
import subprocess, sys
log = open(sys.argv[2], "wb")
p = subprocess.Popen([sys.argv[1]], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                     start_new_session=True, close_fds=True)
print(p.pid)' "$work/counter_tree" "$work/log")
sleep 1
echo "== a live tree: $tree_pid and its children"
ps -o pid,ppid,pgid,sid,stat,cmd --ppid "$tree_pid" -p "$tree_pid"
tail -n 3 "$work/log"

echo; echo "== pycr check"
"$pycr" check || true

echo; echo "== pycr dump -t $tree_pid -D images -v   (the tree is killed afterwards, as criu does)"
"$pycr" dump -t "$tree_pid" -D "$work/images" -v
lines_at_dump=$(wc -l < "$work/log")
echo "last lines before the checkpoint:"; tail -n 3 "$work/log"

echo; echo "== pycr show images (inventory, tree, one core image)"
"$pycr" show "$work/images/inventory.img"
"$pycr" show "$work/images/pstree.img"
ls -l "$work/images"

echo; echo "== pycr restore -D images -d"
"$pycr" restore -D "$work/images" -d -v
echo "$tree_pid" > "$work/restored.pids"
sleep 1
echo "the same PIDs again:"
ps -o pid,ppid,pgid,sid,stat,cmd --ppid "$tree_pid" -p "$tree_pid"
echo "and they go on counting from where they stopped (first lines written after the restore):"
tail -n +"$((lines_at_dump + 1))" "$work/log" | head -n 6

echo; echo "== pycr migrate -t $tree_pid   (live migration into a replica: pre-dump passes while it runs, a short final dump)"
"$pycr" migrate -t "$tree_pid" --work-dir "$work/migrate" | tee "$work/migrate.out"
# "replica: root pid N (pid OUTER outside its namespace, namespace init INIT)": kill those at exit too.
sed -n 's/.*(pid \([0-9]*\) outside its namespace, namespace init \([0-9]*\)).*/\2 \1/p' "$work/migrate.out" >> "$work/restored.pids"
lines_at_migrate=$(wc -l < "$work/log")
sleep 1
echo "the replica, in its own PID namespace (NSpid: outside, inside) keeps counting:"
replica=$(sed -n 's/.*(pid \([0-9]*\) outside its namespace.*/\1/p' "$work/migrate.out")
grep NSpid "/proc/$replica/status"
tail -n +"$((lines_at_migrate + 1))" "$work/log" | head -n 3
