using ActorVmm.Devices.Virtio;
using static ActorVmm.Devices.Virtio.VirtioStatus;

namespace ActorVmm.Devices.Tests.Virtio;

public sealed class VirtioPciCommonConfigTests
{
    // Register offsets of §4.1.4.3, as a driver writes them.
    private const ulong DeviceFeatureSelect = 0x00, DeviceFeature = 0x04, DriverFeatureSelect = 0x08, DriverFeature = 0x0C;
    private const ulong MsixConfig = 0x10, NumQueues = 0x12, DeviceStatus = 0x14, ConfigGeneration = 0x15;
    private const ulong QueueSelect = 0x16, QueueSize = 0x18, QueueMsixVector = 0x1A, QueueEnable = 0x1C, QueueNotifyOff = 0x1E;
    private const ulong QueueDesc = 0x20, QueueDriver = 0x28, QueueDevice = 0x30;

    private const ulong Offered = VirtioFeatures.Version1 | VirtioFeatures.EventIdx | (1UL << 3);

    private readonly TestGuestMemory _m = new();
    private int _resets;
    private int _driverOks;
    private readonly VirtioPciCommonConfig _c;

    public VirtioPciCommonConfigTests() =>
        _c = new VirtioPciCommonConfig(new GuestRam(_m), Offered, [256, 64], 3, () => _resets++, () => _driverOks++);

    private ulong Status => _c.Read(DeviceStatus, 1);

    private void Negotiate(ulong features)
    {
        _c.Write(DeviceStatus, 1, Acknowledge);
        _c.Write(DeviceStatus, 1, Acknowledge | Driver);
        _c.Write(DriverFeatureSelect, 4, 0);
        _c.Write(DriverFeature, 4, (uint)features);
        _c.Write(DriverFeatureSelect, 4, 1);
        _c.Write(DriverFeature, 4, (uint)(features >> 32));
        _c.Write(DeviceStatus, 1, Acknowledge | Driver | FeaturesOk);
    }

    private void ConfigureQueue(ushort queue, ushort size, ulong desc, ulong driver, ulong device)
    {
        _c.Write(QueueSelect, 2, queue);
        _c.Write(QueueSize, 2, size);
        _c.Write(QueueDesc, 8, desc);
        _c.Write(QueueDriver, 8, driver);
        _c.Write(QueueDevice, 8, device);
    }

    [Fact]
    public void Device_features_are_offered_32_bits_at_a_time_with_version_1()
    {
        _c.Write(DeviceFeatureSelect, 4, 0);
        Assert.Equal(Offered & 0xFFFF_FFFF, _c.Read(DeviceFeature, 4));
        _c.Write(DeviceFeatureSelect, 4, 1);
        Assert.Equal(1UL, _c.Read(DeviceFeature, 4)); // VIRTIO_F_VERSION_1 is bit 32
        _c.Write(DeviceFeatureSelect, 4, 2);
        Assert.Equal(0UL, _c.Read(DeviceFeature, 4)); // §4.1.4.3.1: 0 beyond the defined bits
        Assert.Equal(2UL, _c.Read(DeviceFeatureSelect, 4));
    }

    [Fact]
    public void Version_1_is_offered_even_if_the_device_forgets_it()
    {
        var c = new VirtioPciCommonConfig(new GuestRam(_m), 0, [16], 1);
        c.Write(DeviceFeatureSelect, 4, 1);

        Assert.Equal(1UL, c.Read(DeviceFeature, 4));
    }

    [Fact]
    public void Driver_initialisation_reaches_driver_ok_in_the_spec_order()
    {
        // §3.1.1: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (re-read), queues, DRIVER_OK.
        _c.Write(DeviceStatus, 1, 0);
        Negotiate(VirtioFeatures.Version1 | VirtioFeatures.EventIdx);
        Assert.Equal((ulong)(Acknowledge | Driver | FeaturesOk), Status);
        Assert.False(_c.IsLive);

        _c.Write(DeviceStatus, 1, Acknowledge | Driver | FeaturesOk | DriverOk);

        Assert.Equal((ulong)(Acknowledge | Driver | FeaturesOk | DriverOk), Status);
        Assert.True(_c.IsLive);
        Assert.Equal(VirtioFeatures.Version1 | VirtioFeatures.EventIdx, _c.DriverFeatures);
        Assert.Equal(1, _driverOks);
    }

    [Fact]
    public void Features_ok_is_refused_without_version_1()
    {
        Negotiate(VirtioFeatures.EventIdx);

        Assert.Equal((ulong)(Acknowledge | Driver), Status); // §3.1.1 step 6: the driver sees it clear
    }

    [Fact]
    public void Features_ok_is_refused_for_a_feature_the_device_did_not_offer()
    {
        Negotiate(VirtioFeatures.Version1 | VirtioFeatures.IndirectDesc);

        Assert.Equal((ulong)(Acknowledge | Driver), Status);
    }

    [Fact]
    public void Status_bits_are_taken_only_in_order()
    {
        _c.Write(DeviceStatus, 1, DriverOk);
        Assert.Equal(0UL, Status);
        _c.Write(DeviceStatus, 1, Acknowledge | DriverOk);
        Assert.Equal((ulong)Acknowledge, Status);
        _c.Write(DriverFeatureSelect, 4, 1);
        _c.Write(DriverFeature, 4, 1);
        _c.Write(DeviceStatus, 1, Acknowledge | FeaturesOk); // FEATURES_OK before DRIVER
        Assert.Equal((ulong)Acknowledge, Status);
        _c.Write(DeviceStatus, 1, Acknowledge | Driver | FeaturesOk | DriverOk); // all at once, in order
        Assert.Equal((ulong)(Acknowledge | Driver | FeaturesOk | DriverOk), Status);
    }

    [Fact]
    public void Driver_cannot_clear_status_bits_or_set_device_needs_reset()
    {
        Negotiate(VirtioFeatures.Version1);

        _c.Write(DeviceStatus, 1, Acknowledge);
        Assert.Equal((ulong)(Acknowledge | Driver | FeaturesOk), Status);
        _c.Write(DeviceStatus, 1, Acknowledge | Driver | FeaturesOk | DeviceNeedsReset);
        Assert.Equal((ulong)(Acknowledge | Driver | FeaturesOk), Status);
        _c.Write(DeviceStatus, 1, Acknowledge | Failed);
        Assert.Equal((ulong)(Acknowledge | Driver | FeaturesOk | Failed), Status);
        Assert.False(_c.IsLive);
    }

    [Fact]
    public void Driver_features_are_frozen_after_features_ok()
    {
        Negotiate(VirtioFeatures.Version1);
        _c.Write(DriverFeatureSelect, 4, 0);

        _c.Write(DriverFeature, 4, (uint)VirtioFeatures.EventIdx);

        Assert.Equal(0UL, _c.Read(DriverFeature, 4));
        Assert.Equal(VirtioFeatures.Version1, _c.DriverFeatures);
    }

    [Fact]
    public void Writing_zero_to_status_resets_everything()
    {
        Negotiate(VirtioFeatures.Version1);
        _c.Write(MsixConfig, 2, 2);
        ConfigureQueue(1, 32, DriverRing.DefaultDesc, DriverRing.DefaultAvail, DriverRing.DefaultUsed);
        _c.Write(QueueMsixVector, 2, 1);
        _c.Write(QueueEnable, 2, 1);
        Assert.NotNull(_c.Queue(1));

        _c.Write(DeviceStatus, 1, 0);

        Assert.Equal(0UL, Status); // §4.1.4.3.1: 0 once the reset is done
        Assert.Equal(1, _resets);
        Assert.Equal(0UL, _c.DriverFeatures);
        Assert.Equal(0xFFFFUL, _c.Read(MsixConfig, 2));
        Assert.Equal(0UL, _c.Read(QueueSelect, 2));
        _c.Write(QueueSelect, 2, 1);
        Assert.Equal(0UL, _c.Read(QueueEnable, 2));
        Assert.Equal(64UL, _c.Read(QueueSize, 2));
        Assert.Equal(0xFFFFUL, _c.Read(QueueMsixVector, 2));
        Assert.Equal(0UL, _c.Read(QueueDesc, 8));
        Assert.Null(_c.Queue(1));
    }

    [Fact]
    public void Queue_registers_read_back_per_selected_queue()
    {
        Assert.Equal(2UL, _c.Read(NumQueues, 2));
        ConfigureQueue(0, 128, 0x1_0000, 0x2_0000, 0x3_0000);
        _c.Write(QueueSelect, 2, 1);
        _c.Write(QueueDesc, 4, 0x4_0000); // a 64-bit field as two 32-bit halves (§4.1.3.1)
        _c.Write(QueueDesc + 4, 4, 0x1);

        Assert.Equal(64UL, _c.Read(QueueSize, 2));
        Assert.Equal(0x1_0004_0000UL, _c.Read(QueueDesc, 8));
        Assert.Equal(0x4_0000UL, _c.Read(QueueDesc, 4));
        Assert.Equal(0x1UL, _c.Read(QueueDesc + 4, 4));
        Assert.Equal(1UL, _c.Read(QueueNotifyOff, 2));
        _c.Write(QueueSelect, 2, 0);
        Assert.Equal(128UL, _c.Read(QueueSize, 2));
        Assert.Equal(0x2_0000UL, _c.Read(QueueDriver, 8));
        Assert.Equal(0x3_0000UL, _c.Read(QueueDevice, 8));
        Assert.Equal(0UL, _c.Read(QueueNotifyOff, 2));
    }

    [Fact]
    public void A_queue_that_does_not_exist_reads_size_zero_and_ignores_writes()
    {
        _c.Write(QueueSelect, 2, 7);
        _c.Write(QueueSize, 2, 16);
        _c.Write(QueueDesc, 8, 0x1000);
        _c.Write(QueueEnable, 2, 1);

        Assert.Equal(0UL, _c.Read(QueueSize, 2));
        Assert.Equal(0UL, _c.Read(QueueDesc, 8));
        Assert.Equal(0UL, _c.Read(QueueEnable, 2));
        Assert.Equal(7UL, _c.Read(QueueSelect, 2));
    }

    [Fact]
    public void An_enabled_queue_keeps_its_configuration_and_cannot_be_disabled_by_writing_zero()
    {
        Negotiate(VirtioFeatures.Version1);
        ConfigureQueue(0, 16, DriverRing.DefaultDesc, DriverRing.DefaultAvail, DriverRing.DefaultUsed);
        _c.Write(QueueEnable, 2, 1);

        _c.Write(QueueSize, 2, 8);
        _c.Write(QueueDesc, 8, 0x9_0000);
        _c.Write(QueueEnable, 2, 0);

        Assert.Equal(1UL, _c.Read(QueueEnable, 2));
        Assert.Equal(16UL, _c.Read(QueueSize, 2));
        Assert.Equal(DriverRing.DefaultDesc, _c.Read(QueueDesc, 8));
        Assert.Equal(16, _c.Queue(0)!.Size);
    }

    [Theory]
    [InlineData((ushort)12)] // not a power of two
    [InlineData((ushort)512)] // above the queue's maximum (256)
    [InlineData((ushort)0)]
    public void Enabling_a_queue_with_a_bad_size_sets_device_needs_reset(ushort size)
    {
        Negotiate(VirtioFeatures.Version1);
        ConfigureQueue(0, size, DriverRing.DefaultDesc, DriverRing.DefaultAvail, DriverRing.DefaultUsed);

        _c.Write(QueueEnable, 2, 1);

        Assert.Equal(VirtqueueError.InvalidQueueSize, _c.Queue(0)!.Error);
        Assert.Equal((ulong)DeviceNeedsReset, Status & DeviceNeedsReset);
    }

    [Fact]
    public void Enabling_a_queue_whose_rings_are_outside_ram_sets_device_needs_reset()
    {
        Negotiate(VirtioFeatures.Version1);
        ConfigureQueue(0, 16, 0xDEAD_0000, DriverRing.DefaultAvail, DriverRing.DefaultUsed);

        _c.Write(QueueEnable, 2, 1);

        Assert.Equal(VirtqueueError.RingOutsideRam, _c.Queue(0)!.Error);
        Assert.Equal((ulong)DeviceNeedsReset, Status & DeviceNeedsReset);
        Assert.Equal(0, _m.AccessesOutside);
    }

    [Fact]
    public void Msix_vectors_beyond_the_table_read_back_as_no_vector()
    {
        _c.Write(MsixConfig, 2, 2);
        Assert.Equal(2UL, _c.Read(MsixConfig, 2));
        _c.Write(MsixConfig, 2, 3); // the table has 3 entries
        Assert.Equal(0xFFFFUL, _c.Read(MsixConfig, 2));
        _c.Write(QueueMsixVector, 2, 1);
        Assert.Equal(1UL, _c.Read(QueueMsixVector, 2));
        _c.Write(QueueMsixVector, 2, 0x8000);
        Assert.Equal(0xFFFFUL, _c.Read(QueueMsixVector, 2));
    }

    [Fact]
    public void Read_only_registers_ignore_writes()
    {
        _c.Write(DeviceFeature, 4, 0);
        _c.Write(NumQueues, 2, 9);
        _c.Write(ConfigGeneration, 1, 9);
        _c.Write(QueueNotifyOff, 2, 9);

        Assert.Equal(Offered & 0xFFFF_FFFF, _c.Read(DeviceFeature, 4));
        Assert.Equal(2UL, _c.Read(NumQueues, 2));
        Assert.Equal(0UL, _c.Read(ConfigGeneration, 1));
        Assert.Equal(0UL, _c.Read(QueueNotifyOff, 2));
    }

    [Fact]
    public void Config_generation_moves_on_when_the_device_configuration_changes()
    {
        _c.BumpConfigGeneration();

        Assert.Equal(1UL, _c.Read(ConfigGeneration, 1));
    }

    [Fact]
    public void Accesses_at_the_wrong_width_read_zero_and_are_ignored()
    {
        _c.Write(DeviceStatus, 2, Acknowledge); // status is a byte
        _c.Write(QueueSelect, 4, 1); // queue_select is 16 bits
        _c.Write(QueueSize, 1, 8);

        Assert.Equal(0UL, Status);
        Assert.Equal(0UL, _c.Read(QueueSelect, 2));
        Assert.Equal(256UL, _c.Read(QueueSize, 2));
        Assert.Equal(0UL, _c.Read(NumQueues, 4));
        Assert.Equal(0UL, _c.Read(DeviceFeature, 2));
        Assert.Equal(0UL, _c.Read(DeviceFeature + 1, 4));
    }

    [Fact]
    public void Device_needs_reset_asks_for_a_config_notification_only_once_and_only_after_driver_ok()
    {
        Assert.False(_c.MarkNeedsReset()); // before DRIVER_OK: no notification (§2.1.2)
        _c.Write(DeviceStatus, 1, 0);
        Negotiate(VirtioFeatures.Version1);
        _c.Write(DeviceStatus, 1, Acknowledge | Driver | FeaturesOk | DriverOk);

        Assert.True(_c.MarkNeedsReset());
        Assert.False(_c.MarkNeedsReset());
        Assert.False(_c.IsLive);
        Assert.Equal((ulong)DeviceNeedsReset, Status & DeviceNeedsReset);
    }

    [Fact]
    public void State_round_trips_with_an_enabled_queue()
    {
        Negotiate(VirtioFeatures.Version1 | VirtioFeatures.EventIdx);
        ConfigureQueue(1, 32, DriverRing.DefaultDesc, DriverRing.DefaultAvail, DriverRing.DefaultUsed);
        _c.Write(QueueMsixVector, 2, 2);
        _c.Write(QueueEnable, 2, 1);
        _c.Write(DeviceStatus, 1, Acknowledge | Driver | FeaturesOk | DriverOk);
        var state = _c.State();

        var restored = VirtioPciCommonConfig.FromState(new GuestRam(_m), Offered, 3, state);

        Assert.Equal(state.Status, restored.Status);
        Assert.True(restored.IsLive);
        Assert.Equal(32, restored.Queue(1)!.Size);
        Assert.Null(restored.Queue(0));
        Assert.Equal(2, restored.QueueMsixVectorOf(1));
        Assert.Equal(1UL, restored.Read(QueueSelect, 2));
        Assert.Equal(1UL, restored.Read(QueueEnable, 2));
        Assert.Equal(state with { Queues = [state.Queues[0], state.Queues[1] with { Ring = state.Queues[1].Ring! with { SignalledUsed = null } }] },
            restored.State());
    }

    [Fact]
    public void Random_register_accesses_never_throw()
    {
        var rng = new Random(6);
        int[] sizes = [-1, 0, 1, 2, 3, 4, 8, 16];
        for (var i = 0; i < 20_000; i++)
        {
            var offset = rng.Next(3) == 0 ? (ulong)rng.NextInt64() : (ulong)rng.Next(0, 0x48);
            var size = sizes[rng.Next(sizes.Length)];
            if (rng.Next(2) == 0) _c.Read(offset, size);
            else _c.Write(offset, size, (ulong)rng.NextInt64());
        }
        Assert.Equal(0, _m.AccessesOutside);
        Assert.Equal(0, _m.RomWrites);
    }
}
