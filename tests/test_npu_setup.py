def test_x():
    import test_npu_setup
    print(test_npu_setup.__file__)
