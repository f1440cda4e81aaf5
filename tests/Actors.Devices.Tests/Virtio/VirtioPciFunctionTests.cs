using ActorVmm.Devices.Pci;
using ActorVmm.Devices.Virtio;
using ActorVmm.LibVmm;
using static ActorVmm.Devices.Virtio.VirtioStatus;
using static ActorVmm.Devices.Virtio.VirtqFlags;

namespace ActorVmm.Devices.Tests.Virtio;

/// <summary>virtio-rng as a PCI function (<see cref="VirtioPciFunction"/>), driven through its
/// configuration space and its BAR as a driver would: identity, the capability list, BAR sizing and
/// the BAR events, MSI-X delivery with masking and pending bits, INTx through the ISR, and its state record.</summary>
public sealed class VirtioPciFunctionTests
{
    private const int Slot = 1;
    private const ulong Bar = VirtioPciFunction.BarWindow;
    private const ulong BarAddress = 0xD000_0000;
    private const ulong Data = 0x4_0000;
    private const ushort Size = 16;
    // Common configuration registers (§4.1.4.3).
    private const ulong DeviceStatus = 0x14, QueueSelect = 0x16, QueueSize = 0x18, QueueMsixVector = 0x1A, QueueEnable = 0x1C;
    private const ulong QueueDesc = 0x20, QueueDriver = 0x28, QueueDevice = 0x30, DriverFeatureSelect = 0x08, DriverFeature = 0x0C;
    private const ulong ConfigMsixVector = 0x10;

    private readonly TestGuestMemory _m = new();
    private readonly DriverRing _d;
    private readonly RecordingInterruptLine _intx = new();
    private readonly List<MsiMessage> _msi = [];
    private readonly List<PciBarChange> _bars = [];
    private VirtioPciFunction _f;
    private byte _next = 1;

    public VirtioPciFunctionTests()
    {
        _d = new DriverRing(_m, Size);
        _f = New();
    }

    private VirtioPciFunction New() => new(Slot, new VirtioRng(_m, Entropy), new GuestRam(_m), _intx, _msi.Add, _bars.Add);

    private void Entropy(Span<byte> s)
    {
        for (var i = 0; i < s.Length; i++) s[i] = _next++;
    }

    private uint Cfg(int register, int size = 4) => (uint)_f.Read(VirtioPciFunction.ConfigWindow + (ulong)register, size);

    private void SetCfg(int register, int size, uint value) => _f.Write(VirtioPciFunction.ConfigWindow + (ulong)register, size, value);

    /// <summary>BAR 0 at <see cref="BarAddress"/>, memory decoding and bus mastering on.</summary>
    private void Place()
    {
        SetCfg(0x10, 4, (uint)BarAddress);
        SetCfg(0x14, 4, 0);
        SetCfg(0x04, 2, PciConfigSpace.CommandMemorySpace | PciConfigSpace.CommandBusMaster);
    }

    /// <summary>The offset of the first capability with <paramref name="id"/> (and virtio cfg_type
    /// <paramref name="type"/> for vendor capabilities), found by walking the list as a driver does.</summary>
    private int FindCapability(byte id, byte? type = null)
    {
        var at = (int)Cfg(0x34, 1);
        for (var hops = 0; at != 0 && hops < 48; hops++)
        {
            if (Cfg(at, 1) == id && (type is null || Cfg(at + 3, 1) == type)) return at;
            at = (int)Cfg(at + 1, 1);
        }
        return 0;
    }

    private void Initialise(bool msix)
    {
        Place();
        if (msix)
        {
            var cap = FindCapability(MsiXCapability.CapabilityId);
            SetCfg(cap + 2, 2, MsiXCapability.ControlEnable);
            // Vector 0 (the queue): address 0xFEE01000 (APIC 1), data 0x45; vector 1 (configuration): 0x46.
            _f.Write(Bar + VirtioPciFunction.MsixTableOffset, 4, 0xFEE0_1000);
            _f.Write(Bar + VirtioPciFunction.MsixTableOffset + 8, 4, 0x45);
            _f.Write(Bar + VirtioPciFunction.MsixTableOffset + 12, 4, 0);
            _f.Write(Bar + VirtioPciFunction.MsixTableOffset + 16, 4, 0xFEE0_1000);
            _f.Write(Bar + VirtioPciFunction.MsixTableOffset + 24, 4, 0x46);
            _f.Write(Bar + VirtioPciFunction.MsixTableOffset + 28, 4, 0);
        }
        Common(DeviceStatus, 1, 0);
        Common(DeviceStatus, 1, Acknowledge | Driver);
        Common(DriverFeatureSelect, 4, 1);
        Common(DriverFeature, 4, 1); // VIRTIO_F_VERSION_1
        Common(DeviceStatus, 1, Acknowledge | Driver | FeaturesOk);
        Common(ConfigMsixVector, 2, msix ? 1u : VirtioPciCommonConfig.NoVector);
        Common(QueueSelect, 2, 0);
        Common(QueueSize, 2, Size);
        Common(QueueMsixVector, 2, msix ? 0u : VirtioPciCommonConfig.NoVector);
        Common(QueueDesc, 8, _d.Desc);
        Common(QueueDriver, 8, _d.Avail);
        Common(QueueDevice, 8, _d.Used);
        Common(QueueEnable, 2, 1);
        Common(DeviceStatus, 1, Acknowledge | Driver | FeaturesOk | DriverOk);
    }

    private void Common(ulong register, int size, ulong value) => _f.Write(Bar + VirtioPciFunction.CommonOffset + register, size, value);

    private ulong ReadCommon(ulong register, int size) => _f.Read(Bar + VirtioPciFunction.CommonOffset + register, size);

    private void PostBuffer(ushort head = 0, uint length = 16)
    {
        _m.Fill(Data + head * 0x100UL, (int)length, 0xEE);
        _d.SetDesc(head, Data + head * 0x100UL, length, DescWrite);
        _d.MakeAvailable(head);
    }

    private void Notify() => _f.Write(Bar + VirtioPciFunction.NotifyOffset, 2, 0);

    [Fact]
    public void Identifies_as_a_modern_virtio_entropy_function_with_inta_routed_to_its_wire()
    {
        Assert.Equal(0x1044_1AF4u, Cfg(0x00));
        Assert.Equal(1u, Cfg(0x08, 1));                  // revision 1: non-transitional (§4.1.2.1)
        Assert.Equal(0xFF_00_00u, Cfg(0x08) >> 8);        // class FF/00/00
        Assert.Equal(0x1044_1AF4u, Cfg(0x2C));           // subsystem vendor 0x1AF4, subsystem ID 0x1044 (≥ 0x40)
        Assert.Equal(1u, Cfg(0x3D, 1));                  // INTA#
        Assert.Equal(PciInterruptRouting.Gsi(Slot, PciInterruptPin.IntA), Cfg(0x3C, 1)); // GSI 17, as a BIOS would set it
        Assert.Equal(0u, Cfg(0x0E, 1));                  // header type 0, single function
        Assert.NotEqual(0u, Cfg(0x06, 2) & PciConfigSpace.StatusCapabilitiesList);
        Assert.Equal(0xFFFF_FFFFUL, _f.Read(VirtioPciFunction.ConfigWindow + 0x100, 4)); // no extended space
        Assert.Equal(ulong.MaxValue, _f.Read(VirtioPciFunction.ConfigWindow, 8));         // not a configuration request
    }

    [Fact]
    public void Capability_list_holds_msix_and_the_virtio_structures_in_bar_0()
    {
        var msix = FindCapability(MsiXCapability.CapabilityId);
        Assert.NotEqual(0, msix);
        Assert.Equal(1u, Cfg(msix + 2, 2) & 0x7FF);      // table size 2 (N - 1): the queue and the configuration
        Assert.Equal(VirtioPciFunction.MsixTableOffset | 0u, Cfg(msix + 4));
        Assert.Equal(VirtioPciFunction.MsixPbaOffset | 0u, Cfg(msix + 8));

        (uint Bar, uint Offset, uint Length) Virtio(byte type)
        {
            var at = FindCapability(VirtioPciFunction.VendorCapabilityId, type);
            Assert.NotEqual(0, at);
            Assert.Equal(type == VirtioPciFunction.CapNotifyCfg ? 20u : 16u, Cfg(at + 2, 1)); // cap_len
            return (Cfg(at + 4, 1), Cfg(at + 8), Cfg(at + 12));
        }
        Assert.Equal((0u, VirtioPciFunction.CommonOffset, (uint)VirtioPciCommonConfig.Length), Virtio(VirtioPciFunction.CapCommonCfg));
        Assert.Equal((0u, VirtioPciFunction.NotifyOffset, 4u), Virtio(VirtioPciFunction.CapNotifyCfg));
        Assert.Equal((0u, VirtioPciFunction.IsrOffset, 1u), Virtio(VirtioPciFunction.CapIsrCfg));
        var notify = FindCapability(VirtioPciFunction.VendorCapabilityId, VirtioPciFunction.CapNotifyCfg);
        Assert.Equal((uint)VirtioPciTransport.NotifyOffMultiplier, Cfg(notify + 16));
        Assert.Equal(0, FindCapability(VirtioPciFunction.VendorCapabilityId, VirtioPciFunction.CapDeviceCfg)); // rng has no configuration
    }

    [Fact]
    public void Bar_0_sizes_as_64_bit_memory_and_its_moves_are_reported_only_while_memory_decoding_is_on()
    {
        SetCfg(0x10, 4, 0xFFFF_FFFF);
        SetCfg(0x14, 4, 0xFFFF_FFFF);
        Assert.Equal(0xFFFF_8004u, Cfg(0x10));            // 32 KiB, 64-bit, not prefetchable
        Assert.Equal(0xFFFF_FFFFu, Cfg(0x14));
        SetCfg(0x10, 4, (uint)BarAddress);
        SetCfg(0x14, 4, 0);
        Assert.Empty(_bars);                              // memory decoding is off

        SetCfg(0x04, 2, PciConfigSpace.CommandMemorySpace);
        Assert.Equal([new PciBarChange(Slot, 0, 0, PciBarKind.Memory64, VirtioPciFunction.BarSize, null, BarAddress)], _bars);
        SetCfg(0x10, 4, 0xD001_0000);
        Assert.Equal(new PciBarChange(Slot, 0, 0, PciBarKind.Memory64, VirtioPciFunction.BarSize, BarAddress, 0xD001_0000), _bars[^1]);
        SetCfg(0x04, 2, 0);
        Assert.Equal(new PciBarChange(Slot, 0, 0, PciBarKind.Memory64, VirtioPciFunction.BarSize, 0xD001_0000, null), _bars[^1]);
        Assert.Equal(0xFFUL, _f.Read(Bar + VirtioPciFunction.CommonOffset + DeviceStatus, 1)); // not decoding: all ones
    }

    [Fact]
    public void A_used_buffer_is_signalled_through_its_msix_vector_as_an_apic_message()
    {
        Initialise(msix: true);
        PostBuffer();
        Notify();

        Assert.Equal((0u, 16u), _d.UsedElem(0));
        Assert.Equal([new MsiMessage(0xFEE0_1000, 0x45)], _msi);
        Assert.False(_intx.Level);
        var apic = MsiDecoding.ToApicMessage(_msi[0]);
        Assert.Equal(new ApicMessage(0x45, DeliveryMode.Fixed, false, 1, true, false), apic);
    }

    [Fact]
    public void A_masked_vector_becomes_pending_and_fires_when_unmasked()
    {
        Initialise(msix: true);
        _f.Write(Bar + VirtioPciFunction.MsixTableOffset + 12, 4, MsiXTable.VectorControlMask); // mask vector 0
        PostBuffer();
        Notify();

        Assert.Empty(_msi);
        Assert.Equal(1UL, _f.Read(Bar + VirtioPciFunction.MsixPbaOffset, 8) & 1); // pending (§6.8.2.10)
        _f.Write(Bar + VirtioPciFunction.MsixTableOffset + 12, 4, 0);
        Assert.Equal([new MsiMessage(0xFEE0_1000, 0x45)], _msi);
        Assert.Equal(0UL, _f.Read(Bar + VirtioPciFunction.MsixPbaOffset, 8) & 1);
    }

    [Fact]
    public void Without_msix_the_used_buffer_asserts_inta_until_the_isr_is_read()
    {
        Initialise(msix: false);
        PostBuffer();
        Notify();

        Assert.Empty(_msi);
        Assert.True(_intx.Level);
        Assert.NotEqual(0u, Cfg(0x06, 2) & PciConfigSpace.StatusInterrupt);
        Assert.Equal((ulong)VirtioPciTransport.IsrQueue, _f.Read(Bar + VirtioPciFunction.IsrOffset, 1));
        Assert.False(_intx.Level);
        Assert.Equal(0UL, _f.Read(Bar + VirtioPciFunction.IsrOffset, 1));
    }

    [Fact]
    public void Without_bus_mastering_a_notification_touches_no_memory()
    {
        Initialise(msix: true);
        SetCfg(0x04, 2, PciConfigSpace.CommandMemorySpace);
        PostBuffer();
        Notify();

        Assert.Equal(0, _d.UsedIdx);
        Assert.Empty(_msi);
        SetCfg(0x04, 2, PciConfigSpace.CommandMemorySpace | PciConfigSpace.CommandBusMaster);
        Notify();
        Assert.Equal(1, _d.UsedIdx);
        Assert.Single(_msi);
    }

    [Fact]
    public void A_descriptor_outside_ram_sets_device_needs_reset_and_signals_a_configuration_change()
    {
        Initialise(msix: true);
        _d.SetDesc(0, 0x8000_0000, 64, DescWrite);
        _d.MakeAvailable(0);
        Notify();

        Assert.Equal(0, _d.UsedIdx);
        Assert.NotEqual(0UL, ReadCommon(DeviceStatus, 1) & DeviceNeedsReset);
        Assert.Equal([new MsiMessage(0xFEE0_1000, 0x46)], _msi); // the configuration vector (§4.1.5.4)
        Assert.Equal(0, _m.AccessesOutside);
    }

    [Fact]
    public void Restored_function_decodes_its_bar_where_it_did_and_goes_on_from_its_used_ring()
    {
        Initialise(msix: true);
        _f.Write(Bar + VirtioPciFunction.MsixTableOffset + 12, 4, MsiXTable.VectorControlMask);
        PostBuffer(0);
        Notify();
        var state = Assert.IsType<VirtioPciFunctionState>(_f.SaveState());
        var json = DeviceStateCodec.Encode(state);
        var decoded = Assert.IsType<VirtioPciFunctionState>(DeviceStateCodec.Decode(json));
        Assert.Equal(state, decoded);

        _bars.Clear();
        _msi.Clear();
        _f = VirtioPciFunction.FromState(decoded, new VirtioRng(_m, Entropy), new GuestRam(_m), _intx, _msi.Add, _bars.Add);
        Assert.Equal([new PciBarChange(Slot, 0, 0, PciBarKind.Memory64, VirtioPciFunction.BarSize, null, BarAddress)], _bars);
        Assert.Equal(state.Config, ((VirtioPciFunctionState)_f.SaveState()).Config);
        _f.Write(Bar + VirtioPciFunction.MsixTableOffset + 12, 4, 0); // the pending vector survives and fires on unmask
        Assert.Equal([new MsiMessage(0xFEE0_1000, 0x45)], _msi);
        PostBuffer(1);
        Notify();
        Assert.Equal(2, _d.UsedIdx);
        Assert.Equal((1u, 16u), _d.UsedElem(1));
    }

    /// <summary>A network card over <paramref name="backend"/> in this class's function (queue 0 is its receiveq1).</summary>
    private VirtioNet NetFunction(FakeNetBackend backend, VirtioNetState? state = null)
    {
        Func<ulong> features = () => _f.Transport.Common.DriverFeatures;
        var net = state is null ? new VirtioNet(_m, backend, new MacAddress(0x5254_0012_3456), features)
            : VirtioNet.FromState(state, _m, backend, features);
        _f = new VirtioPciFunction(Slot, net, new GuestRam(_m), _intx, _msi.Add, _bars.Add);
        return net;
    }

    private static byte[] NetPacket(byte tag) => [.. new byte[VirtioNetHeader.Size], .. Enumerable.Range(0, 60).Select(i => (byte)(tag + i))];

    [Fact]
    public void Backend_input_fills_the_receive_queue_with_its_msix_interrupt_and_is_dropped_while_the_card_cannot_take_it()
    {
        var backend = new FakeNetBackend();
        var net = NetFunction(backend);

        backend.Incoming.Enqueue(NetPacket(1)); // the driver has not set the card up: the receiver is off
        _f.BackendReady();
        Assert.Empty(backend.Incoming);
        Assert.Equal((0UL, 1UL), (net.RxFrames, net.RxDropped));

        Initialise(msix: true);
        PostBuffer(0, 0x100);
        Notify();
        Assert.Empty(_msi); // a buffer, no frame: nothing used
        var packet = NetPacket(0x40);
        backend.Incoming.Enqueue(packet);
        _f.BackendReady();
        Assert.Equal((0u, (uint)packet.Length), _d.UsedElem(0));
        var written = new byte[packet.Length];
        Assert.True(_m.TryRead(new GuestPhysAddr(Data), written));
        Assert.Equal(packet[VirtioNetHeader.Size..], written[VirtioNetHeader.Size..]);
        Assert.Equal(1, written[VirtioNetHeader.NumBuffersOffset]);
        Assert.Equal([new MsiMessage(0xFEE0_1000, 0x45)], _msi);
        Assert.Equal((1UL, 1UL), (net.RxFrames, net.RxDropped));

        SetCfg(0x04, 2, PciConfigSpace.CommandMemorySpace); // bus mastering off: no memory access, frames dropped
        PostBuffer(1, 0x100);
        backend.Incoming.Enqueue(NetPacket(2));
        _f.BackendReady();
        Assert.Empty(backend.Incoming);
        Assert.Equal(1, _d.UsedIdx);
        Assert.Equal((1UL, 2UL), (net.RxFrames, net.RxDropped));
        Assert.Single(_msi);
    }

    [Fact]
    public void A_net_function_record_keeps_the_cards_counters_through_the_codec()
    {
        var backend = new FakeNetBackend();
        NetFunction(backend);
        Initialise(msix: true);
        PostBuffer(0, 0x100);
        backend.Incoming.Enqueue(NetPacket(3));
        _f.BackendReady();
        var state = Assert.IsType<VirtioPciFunctionState>(_f.SaveState());
        Assert.Equal(new VirtioNetState("52:54:00:12:34:56", 0, 0, 1, 0), state.Net);
        var decoded = Assert.IsType<VirtioPciFunctionState>(DeviceStateCodec.Decode(DeviceStateCodec.Encode(state)));
        Assert.Equal(state, decoded);

        var net = VirtioNet.FromState(decoded.Net!, _m, backend, () => 0);
        _f = VirtioPciFunction.FromState(decoded, net, new GuestRam(_m), _intx, _msi.Add, _bars.Add);
        Assert.Equal(1UL, net.RxFrames);
        Assert.Contains("no virtio-net state", VirtioPciFunction.StateProblem(state with { VirtioDeviceId = 4 }));
        Assert.Contains("multicast", VirtioPciFunction.StateProblem(state with { Net = state.Net! with { Mac = "01:00:5e:00:00:01" } }));
    }

    [Theory]
    [InlineData(0, "slot 0 is not 1-31")]
    [InlineData(1, "the configuration space must have 256 bytes, not 255")]
    public void A_state_that_cannot_be_restored_is_named(int device, string problem)
    {
        var state = (VirtioPciFunctionState)_f.SaveState();
        var bad = device == 0 ? state with { Device = 0 } : state with { Config = new byte[255] };
        var e = Assert.Throws<SnapshotStateException>(() => DeviceStateCodec.Encode(bad));
        Assert.Contains(problem, e.Message);
    }

    [Fact]
    public void Hostile_accesses_never_throw()
    {
        Initialise(msix: true);
        var random = new Random(7);
        for (var i = 0; i < 20_000; i++)
        {
            var offset = random.Next(3) switch
            {
                0 => (ulong)random.Next(0x1100),
                1 => Bar + (ulong)random.Next((int)VirtioPciFunction.BarSize + 16),
                _ => (ulong)random.NextInt64(),
            };
            var size = random.Next(10);
            if (random.Next(2) == 0) _f.Read(offset, size);
            else _f.Write(offset, size, (ulong)random.NextInt64());
        }
    }
}
