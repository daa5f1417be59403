"""The worked example's stage configuration as a Python file (read with ast, never run).

dflsplit stages eval/configs/split/example5.py --model cnn
"""

STAGES_CLIENTS = [
    ["1_1", "1_2", "4_3", "1_4", "1_5", "4_6", "1_7", "1_8"],
    ["2_1", "2_2", "1_3", "2_4", "2_5", "1_6", "2_7", "2_8"],
    ["3_1", "5_2", "5_3", "3_4", "3_5", "5_6", "5_7", "3_8"],
    ["4_1", "4_2", "3_3", "4_4", "4_5", "3_6", "4_7", "4_8"],
    ["5_1", "3_2", "2_3", "5_4", "5_5", "2_6", "3_7", "5_8"],
]
