using ActorVmm.Devices.Virtio;
using static ActorVmm.Devices.Virtio.VirtioStatus;
using static ActorVmm.Devices.Virtio.VirtqFlags;

namespace ActorVmm.Devices.Tests.Virtio;

/// <summary>virtio-rng (§5.4) over the virtio-pci transport (§4.1), driven through its registers as a
/// driver would, with a fixed entropy source.</summary>
public sealed class VirtioRngTests
{
    private const ulong DeviceStatus = 0x14, QueueSelect = 0x16, QueueSize = 0x18, QueueMsixVector = 0x1A, QueueEnable = 0x1C;
    private const ulong QueueDesc = 0x20, QueueDriver = 0x28, QueueDevice = 0x30, DriverFeatureSelect = 0x08, DriverFeature = 0x0C;
    private const ushort Size = 16;
    private const ulong Data = 0x4_0000;

    private readonly TestGuestMemory _m = new();
    private readonly DriverRing _d;
    private readonly RecordingInterruptLine _intx = new();
    private readonly List<ushort> _msix = [];
    private byte _next = 1;
    private readonly VirtioPciTransport _t;

    public VirtioRngTests()
    {
        _d = new DriverRing(_m, Size);
        _t = NewTransport();
    }

    private VirtioPciTransport NewTransport() =>
        new(new GuestRam(_m), new VirtioRng(_m, Entropy), _intx, _msix.Add);

    /// <summary>The fixed "entropy": 1, 2, 3, ... so a test can tell which bytes the device wrote.</summary>
    private void Entropy(Span<byte> s)
    {
        for (var i = 0; i < s.Length; i++) s[i] = _next++;
    }

    private IBusDevice Common => _t.Common;

    /// <summary>§3.1.1 with queue 0 set up at <see cref="DriverRing"/>'s addresses; DRIVER_OK if asked.</summary>
    private void Initialise(ulong features = VirtioFeatures.Version1 | VirtioFeatures.EventIdx | VirtioFeatures.IndirectDesc,
        bool driverOk = true)
    {
        Common.Write(DeviceStatus, 1, 0);
        Common.Write(DeviceStatus, 1, Acknowledge | Driver);
        Common.Write(DriverFeatureSelect, 4, 0);
        Common.Write(DriverFeature, 4, (uint)features);
        Common.Write(DriverFeatureSelect, 4, 1);
        Common.Write(DriverFeature, 4, (uint)(features >> 32));
        Common.Write(DeviceStatus, 1, Acknowledge | Driver | FeaturesOk);
        Common.Write(QueueSelect, 2, 0);
        Common.Write(QueueSize, 2, Size);
        Common.Write(QueueDesc, 8, _d.Desc);
        Common.Write(QueueDriver, 8, _d.Avail);
        Common.Write(QueueDevice, 8, _d.Used);
        Common.Write(QueueEnable, 2, 1);
        if (driverOk) Common.Write(DeviceStatus, 1, Acknowledge | Driver | FeaturesOk | DriverOk);
    }

    private void Kick() => _t.Notify.Write(0, 2, 0);

    [Fact]
    public void Identifies_as_the_entropy_device_with_one_queue()
    {
        var rng = new VirtioRng(_m, Entropy);

        Assert.Equal(4, rng.DeviceId);
        Assert.Equal([VirtioRng.QueueSize], rng.QueueMaxSizes);
        Assert.Equal(1UL, Common.Read(0x12, 2));
        Assert.Equal(0, rng.ConfigLength);
        Assert.Equal(0UL, _t.DeviceConfig.Read(0, 4));
    }

    [Fact]
    public void Request_is_filled_from_the_entropy_source_and_interrupts_over_intx()
    {
        Initialise();
        _m.Fill(Data, 32, 0xEE);
        _d.SetDesc(0, Data, 8, DescWrite | DescNext, 1);
        _d.SetDesc(1, Data + 16, 4, DescWrite);
        _d.MakeAvailable(0);

        Kick();

        Assert.Equal([1, 2, 3, 4, 5, 6, 7, 8], _m.Bytes(Data, 8));
        Assert.Equal([0xEE, 0xEE], _m.Bytes(Data + 8, 2)); // nothing beyond the buffer
        Assert.Equal([9, 10, 11, 12, 0xEE], _m.Bytes(Data + 16, 5));
        Assert.Equal(1, _d.UsedIdx);
        Assert.Equal((0u, 12u), _d.UsedElem(0));
        Assert.True(_intx.Level);
        Assert.Empty(_msix);
    }

    [Fact]
    public void Reading_the_isr_returns_the_queue_bit_clears_it_and_drops_intx()
    {
        Initialise();
        _d.SetDesc(0, Data, 8, DescWrite);
        _d.MakeAvailable(0);
        Kick();

        Assert.Equal(1UL, _t.Isr.Read(0, 1));

        Assert.False(_intx.Level);
        Assert.Equal(0UL, _t.Isr.Read(0, 1));
    }

    [Fact]
    public void With_msix_enabled_the_queue_vector_is_signalled_instead_of_intx()
    {
        Initialise(driverOk: false);
        Common.Write(QueueMsixVector, 2, 1);
        Common.Write(DeviceStatus, 1, Acknowledge | Driver | FeaturesOk | DriverOk);
        _t.MsixEnabled = true;
        _d.SetDesc(0, Data, 8, DescWrite);
        _d.MakeAvailable(0);

        Kick();

        Assert.Equal([(ushort)1], _msix);
        Assert.False(_intx.Level);
    }

    [Fact]
    public void With_msix_enabled_and_no_vector_nothing_is_signalled()
    {
        Initialise();
        _t.MsixEnabled = true;
        _d.SetDesc(0, Data, 8, DescWrite);
        _d.MakeAvailable(0);

        Kick();

        Assert.Equal(1, _d.UsedIdx);
        Assert.Empty(_msix);
        Assert.False(_intx.Level);
    }

    [Fact]
    public void Several_requests_are_completed_in_order_with_one_interrupt_and_notifications_rearmed()
    {
        Initialise();
        for (ushort i = 0; i < 3; i++)
        {
            _d.SetDesc(i, Data + 0x100UL * i, 4, DescWrite);
            _d.MakeAvailable(i);
        }

        Kick();

        Assert.Equal(3, _d.UsedIdx);
        Assert.Equal([(0u, 4u), (1u, 4u), (2u, 4u)], [_d.UsedElem(0), _d.UsedElem(1), _d.UsedElem(2)]);
        Assert.Equal([9, 10, 11, 12], _m.Bytes(Data + 0x200, 4));
        Assert.Equal(1, _intx.Asserts);
        Assert.Equal(3, _d.AvailEvent); // §2.7.10: notify me at the next avail index
    }

    [Fact]
    public void A_chain_with_only_readable_buffers_is_returned_with_length_zero()
    {
        Initialise();
        _m.Fill(Data, 8, 0xEE);
        _d.SetDesc(0, Data, 8);
        _d.MakeAvailable(0);

        Kick();

        Assert.Equal((0u, 0u), _d.UsedElem(0));
        Assert.Equal([0xEE, 0xEE, 0xEE, 0xEE, 0xEE, 0xEE, 0xEE, 0xEE], _m.Bytes(Data, 8));
    }

    [Fact]
    public void A_huge_buffer_gets_at_most_the_per_chain_limit()
    {
        Initialise();
        _d.SetDesc(0, 0x8_0000, 0x8_0000, DescWrite);
        _d.MakeAvailable(0);

        Kick();

        Assert.Equal((0u, (uint)VirtioRng.MaxBytesPerChain), _d.UsedElem(0));
    }

    [Fact]
    public void Buffers_made_available_before_driver_ok_are_used_at_driver_ok_not_before()
    {
        // §2.1.2: the device MUST NOT consume buffers before DRIVER_OK.
        Initialise(driverOk: false);
        _d.SetDesc(0, Data, 8, DescWrite);
        _d.MakeAvailable(0);

        Kick();
        Assert.Equal(0, _d.UsedIdx);
        Assert.False(_intx.Level);

        Common.Write(DeviceStatus, 1, Acknowledge | Driver | FeaturesOk | DriverOk);

        Assert.Equal(1, _d.UsedIdx);
        Assert.True(_intx.Level);
    }

    [Fact]
    public void Notify_writes_for_other_queues_or_of_the_wrong_width_are_ignored()
    {
        Initialise();
        _d.SetDesc(0, Data, 8, DescWrite);
        _d.MakeAvailable(0);

        _t.Notify.Write(4, 2, 1); // queue 1 does not exist
        _t.Notify.Write(0, 1, 0);
        _t.Notify.Write(2, 2, 0);
        Assert.Equal(0, _d.UsedIdx);

        _t.Notify.Write(0, 4, 0);
        Assert.Equal(1, _d.UsedIdx);
    }

    [Fact]
    public void A_hostile_chain_sets_device_needs_reset_and_sends_a_config_interrupt()
    {
        // §2.1.2: after DEVICE_NEEDS_RESET with DRIVER_OK set, the device MUST send a configuration
        // change notification.
        Initialise();
        _m.Fill(Data, 8, 0xEE);
        _d.SetDesc(0, Data, 8, DescWrite | DescNext, 1);
        _d.SetDesc(1, TestGuestMemory.RomBase, 0x10_0000, DescWrite); // firmware and beyond
        _d.MakeAvailable(0);

        Kick();

        Assert.Equal((ulong)DeviceNeedsReset, Common.Read(DeviceStatus, 1) & DeviceNeedsReset);
        Assert.Equal(0, _d.UsedIdx);
        Assert.Equal(VirtioPciTransport.IsrConfig, (byte)_t.Isr.Read(0, 1));
        Assert.Equal(0, _m.AccessesOutside);
        Assert.Equal(0, _m.RomWrites);
        Assert.Equal(Enumerable.Repeat((byte)0xEE, 8), _m.Bytes(Data, 8)); // refused before any write

        _d.SetDesc(1, Data + 0x100, 8, DescWrite); // a broken device stays broken until reset
        Kick();
        Assert.Equal(0, _d.UsedIdx);
    }

    [Fact]
    public void Reset_after_device_needs_reset_makes_the_device_work_again()
    {
        Initialise();
        _d.MakeAvailable(Size); // head out of range
        Kick();
        Assert.True(_intx.Level);

        Common.Write(DeviceStatus, 1, 0);
        Assert.False(_intx.Level); // the reset cleared the ISR
        Assert.Equal(0UL, Common.Read(DeviceStatus, 1));

        _m.Fill(DriverRing.DefaultAvail, 0x100, 0);
        var d = new DriverRing(_m, Size);
        Initialise();
        d.SetDesc(0, Data, 8, DescWrite);
        d.MakeAvailable(0);
        Kick();
        Assert.Equal(1, d.UsedIdx);
    }

    [Fact]
    public void Restarted_transport_continues_from_its_state_record()
    {
        Initialise();
        _d.SetDesc(0, Data, 4, DescWrite);
        _d.MakeAvailable(0);
        Kick();
        var state = _t.State();

        var restarted = VirtioPciTransport.FromState(new GuestRam(_m), new VirtioRng(_m, Entropy), new RecordingInterruptLine(),
            _msix.Add, state);
        _d.SetDesc(1, Data + 0x100, 4, DescWrite);
        _d.MakeAvailable(1);
        restarted.Notify.Write(0, 2, 0);

        Assert.Equal(2, _d.UsedIdx);
        Assert.Equal((1u, 4u), _d.UsedElem(1));
        Assert.Equal(1UL, restarted.Isr.Read(0, 1));
        Assert.Equal(state.Common.Status, restarted.Common.Status);
    }

    [Fact]
    public void Restarted_transport_asserts_intx_again_if_it_was_asserted()
    {
        Initialise();
        _d.SetDesc(0, Data, 4, DescWrite);
        _d.MakeAvailable(0);
        Kick();
        var line = new RecordingInterruptLine();

        VirtioPciTransport.FromState(new GuestRam(_m), new VirtioRng(_m, Entropy), line, _msix.Add, _t.State());

        Assert.True(line.Level);
    }

    [Fact]
    public void Random_driver_never_makes_the_device_throw_or_write_outside_ram()
    {
        var rng = new Random(4);
        for (var round = 0; round < 200; round++)
        {
            Initialise(features: rng.Next(2) == 0 ? VirtioFeatures.Version1 : VirtioFeatures.Version1 | VirtioFeatures.IndirectDesc);
            for (var i = 0; i < Size; i++)
                _d.SetDesc(i, rng.Next(2) == 0 ? (ulong)rng.Next(0, 0x10_2000) : (ulong)rng.NextInt64(),
                    (uint)rng.Next(0, 0x2000), (ushort)rng.Next(0, 8), (ushort)rng.Next(0, Size + 1));
            var n = rng.Next(0, Size + 3);
            for (var i = 0; i < n; i++) _d.MakeAvailable((ushort)rng.Next(0, Size + 1));
            _t.Notify.Write((ulong)rng.Next(0, 2) * 4, 2, 0);
            _t.Isr.Read(0, 1);
            _m.Fill(DriverRing.DefaultAvail, 0x100, 0);
            _m.Fill(DriverRing.DefaultUsed, 0x100, 0);
            _d.SetAvailIdx(0);
        }
        Assert.Equal(0, _m.AccessesOutside);
        Assert.Equal(0, _m.RomWrites);
    }
}
