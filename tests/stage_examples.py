"""The worked example of the split-learning issue, shared by the stage and split tests."""

# 5 clients, P=4 (8 stages): row i lists client i's tasks in order.
EXAMPLE = [
    ["1_1", "1_2", "4_3", "1_4", "1_5", "4_6", "1_7", "1_8"],
    ["2_1", "2_2", "1_3", "2_4", "2_5", "1_6", "2_7", "2_8"],
    ["3_1", "5_2", "5_3", "3_4", "3_5", "5_6", "5_7", "3_8"],
    ["4_1", "4_2", "3_3", "4_4", "4_5", "3_6", "4_7", "4_8"],
    ["5_1", "3_2", "2_3", "5_4", "5_5", "2_6", "3_7", "5_8"],
]
# Every client runs only its own pipeline: no edges.
ALL_LOCAL = [[f"{i}_{s}" for s in range(1, 9)] for i in range(1, 6)]
