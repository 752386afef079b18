P="nice -n 5 ../../.venv/bin/python search.py --budget 120 --eval-every 0.5"
$P --tag A_p7w128d6_fp32 --patch 7 --width 128 --depth 6 --heads 4
$P --tag B_p7w128d6_bf16 --patch 7 --width 128 --depth 6 --heads 4 --bf16 1
$P --tag C_p7w192d6_bf16 --patch 7 --width 192 --depth 6 --heads 3 --bf16 1
$P --tag D_p4w128d6_bf16 --patch 4 --width 128 --depth 6 --heads 4 --bf16 1
