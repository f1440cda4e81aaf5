using ActorVmm.Devices.Pci;

namespace ActorVmm.Devices.Tests.Pci;

/// <summary>Configuration mechanism #1 (PCI Local Bus 3.0 §3.2.2.3.2) and ECAM (PCIe Base 4.0 §7.2.2)
/// through <see cref="PciHostBridge"/>'s windows, and the BAR events of <see cref="PciBus"/>.</summary>
public sealed class PciHostBridgeTests
{
    private const ulong Address = PciHostBridge.ConfigAddressWindow;
    private const ulong Data = PciHostBridge.ConfigDataWindow;

    private sealed class RecordingBarListener : IPciBarListener
    {
        public List<PciBarChange> Changes { get; } = [];
        public void BarChanged(PciBarChange change) => Changes.Add(change);
    }

    private static uint Cf8(int device, int function, int register, int bus = 0, bool enable = true) =>
        (enable ? 0x8000_0000u : 0) | (uint)(bus << 16) | (uint)(device << 11) | (uint)(function << 8) | (uint)register;

    private static ulong EcamOffset(int device, int function, int register, int bus = 0) =>
        (ulong)bus << 20 | (ulong)device << 15 | (ulong)function << 12 | (ulong)register;

    private static (PciHostBridge Bridge, PciConfigSpace Device) BridgeWithDevice(int device = 3)
    {
        var bridge = new PciHostBridge();
        var function = bridge.Bus.Attach(device, 0,
            new PciConfigSpace(new PciIds(0x1AF4, 0x1041, 0x02, 0x00), PciInterruptPin.IntA, extended: true));
        function.AddMemoryBar32(0, 0x1000);
        function.AddMemoryBar64(2, 0x4000);
        function.AddIoBar(4, 0x20);
        return (bridge, function);
    }

    [Fact]
    public void Host_bridge_at_00_00_0_is_class_06_00_00_through_both_mechanisms()
    {
        var bridge = new PciHostBridge();

        bridge.Write(Address, 4, Cf8(0, 0, 0x00));
        Assert.Equal(0x0008_1B36ul, bridge.Read(Data, 4));
        bridge.Write(Address, 4, Cf8(0, 0, 0x08));
        Assert.Equal(0x0600_0000ul, bridge.Read(Data, 4) & 0xFFFF_FF00);

        Assert.Equal(0x0008_1B36ul, bridge.Read(EcamOffset(0, 0, 0x00), 4));
        Assert.Equal(0x06ul, bridge.Read(EcamOffset(0, 0, 0x0B), 1));
    }

    [Fact]
    public void Config_address_latches_only_dword_writes_and_reads_back_without_reserved_bits()
    {
        var bridge = new PciHostBridge();

        bridge.Write(Address, 4, 0xFFFF_FFFF);
        Assert.Equal(0x80FF_FFFCul, bridge.Read(Address, 4)); // 30:24 and 1:0 read 0

        bridge.Write(Address, 2, 0);
        bridge.Write(Address, 1, 0);
        Assert.Equal(0x80FF_FFFCul, bridge.Read(Address, 4));
        Assert.Equal(0xFFul, bridge.Read(Address, 1));   // not CONFIG_ADDRESS: ordinary I/O to nothing
        Assert.Equal(0xFFFFul, bridge.Read(Address, 2));
    }

    [Fact]
    public void Config_data_byte_and_word_accesses_use_their_byte_lanes()
    {
        var bridge = new PciHostBridge();
        bridge.Write(Address, 4, Cf8(0, 0, 0x00));

        Assert.Equal(0x36ul, bridge.Read(Data + 0, 1));
        Assert.Equal(0x1Bul, bridge.Read(Data + 1, 1));
        Assert.Equal(0x08ul, bridge.Read(Data + 2, 1));
        Assert.Equal(0x0008ul, bridge.Read(Data + 2, 2));

        bridge.Write(Address, 4, Cf8(0, 0, 0x3C));
        bridge.Write(Data + 0, 1, 0x0B); // interrupt line, the low lane of dword 0x3C
        bridge.Write(Data + 1, 1, 0x04); // interrupt pin: read-only
        Assert.Equal(0x0000_000Bul, bridge.Read(Data, 4));
        Assert.Equal(0x0Bul, bridge.Read(EcamOffset(0, 0, 0x3C), 1));
    }

    [Fact]
    public void Config_data_past_0xcff_reads_ff_and_is_not_written()
    {
        var (bridge, device) = BridgeWithDevice();
        device.DefineRegister(0x40, 4, 0x1234_5678, 0xFFFF_FFFF);
        device.DefineRegister(0x44, 4, 0, 0xFFFF_FFFF);
        bridge.Write(Address, 4, Cf8(3, 0, 0x40));

        Assert.Equal(0xFFFF_1234ul, bridge.Read(Data + 2, 4)); // lanes 2-3, then nothing
        Assert.Equal(0xFF12ul, bridge.Read(Data + 3, 2));

        bridge.Write(Data + 2, 4, 0xAAAA_BBBB);
        Assert.Equal(0xBBBB_5678u, device.Read(0x40, 4));
        Assert.Equal(0u, device.Read(0x44, 4)); // the bytes past 0xCFF went nowhere
    }

    [Fact]
    public void Disabled_config_address_absent_functions_and_other_buses_read_all_ones()
    {
        var (bridge, _) = BridgeWithDevice(device: 3);

        bridge.Write(Address, 4, Cf8(3, 0, 0x00, enable: false));
        Assert.Equal(0xFFFF_FFFFul, bridge.Read(Data, 4));
        bridge.Write(Address, 4, Cf8(4, 0, 0x00));
        Assert.Equal(0xFFFF_FFFFul, bridge.Read(Data, 4));
        bridge.Write(Address, 4, Cf8(3, 1, 0x00));
        Assert.Equal(0xFFFFul, bridge.Read(Data, 2));
        bridge.Write(Address, 4, Cf8(3, 0, 0x00, bus: 1));
        Assert.Equal(0xFFFF_FFFFul, bridge.Read(Data, 4));
        bridge.Write(Address, 4, Cf8(3, 0, 0x00));
        Assert.Equal(0x1041_1AF4ul, bridge.Read(Data, 4));

        Assert.Equal(0xFFFF_FFFFul, bridge.Read(EcamOffset(4, 0, 0), 4));
        Assert.Equal(0xFFFF_FFFFul, bridge.Read(EcamOffset(3, 7, 0), 4));
        Assert.Equal(0x1041_1AF4ul, bridge.Read(EcamOffset(3, 0, 0), 4));
    }

    [Fact]
    public void Disabled_config_address_drops_writes()
    {
        var (bridge, device) = BridgeWithDevice();

        bridge.Write(Address, 4, Cf8(3, 0, 0x3C, enable: false));
        bridge.Write(Data, 1, 0x42);

        Assert.NotEqual(0x42u, device.Read(0x3C, 1));
    }

    [Fact]
    public void Ecam_reaches_the_extended_space_and_mechanism_1_only_the_first_256_bytes()
    {
        var (bridge, device) = BridgeWithDevice();
        device.DefineRegister(0x40, 4, 0, 0xFFFF_FFFF);

        bridge.Write(EcamOffset(3, 0, 0x40), 4, 0xCAFE_F00D);
        bridge.Write(Address, 4, Cf8(3, 0, 0x40));
        Assert.Equal(0xCAFE_F00Dul, bridge.Read(Data, 4));

        Assert.Equal(0ul, bridge.Read(EcamOffset(3, 0, 0x100), 4)); // extended: an empty list
        Assert.Equal(0xFFFF_FFFFul, bridge.Read(EcamOffset(0x1F, 7, 0xFFC), 4));
    }

    [Fact]
    public void Ecam_accesses_of_8_bytes_or_outside_bus_0_do_nothing()
    {
        var (bridge, device) = BridgeWithDevice();

        bridge.Write(EcamOffset(3, 0, 0x3C), 8, 0);
        Assert.Equal(ulong.MaxValue, bridge.Read(EcamOffset(3, 0, 0), 8));
        Assert.Equal(19u, device.Read(0x3C, 1)); // as Attach set it: device 3 INTA# on GSI 16 + 3
        Assert.Equal(0xFFFF_FFFFul, bridge.Read(Platform.PciEcamLength, 4));
    }

    [Fact]
    public void Attach_sets_the_interrupt_line_to_the_routed_gsi_and_the_multi_function_bit()
    {
        var bridge = new PciHostBridge();
        var f0 = bridge.Bus.Attach(5, 0, new PciConfigSpace(new PciIds(1, 2, 3, 4), PciInterruptPin.IntA));
        Assert.Equal(0u, f0.Read(0x0E, 1));

        var f1 = bridge.Bus.Attach(5, 1, new PciConfigSpace(new PciIds(1, 2, 3, 4), PciInterruptPin.IntB));

        Assert.Equal(0x80u, f0.Read(0x0E, 1));
        Assert.Equal(16u + (5 + 0) % 4, f0.Read(0x3C, 1));
        Assert.Equal(16u + (5 + 1) % 4, f1.Read(0x3C, 1));
        Assert.Equal(0xFFu, bridge.HostBridge.Read(0x3C, 1)); // no pin: left to software
    }

    [Fact]
    public void Bar_events_follow_the_command_register_and_bar_moves()
    {
        var (bridge, _) = BridgeWithDevice();
        var listener = new RecordingBarListener();
        bridge.Bus.Listener = listener;
        void Config(int register, uint value)
        {
            bridge.Write(Address, 4, Cf8(3, 0, register));
            bridge.Write(Data, 4, value);
        }

        // Sizing and placement with decoding off: nothing decodes yet.
        Config(0x10, 0xFFFF_FFFF);
        Config(0x10, 0xD000_0000);
        Config(0x18, 0xD010_0000);
        Config(0x1C, 0);
        Config(0x20, 0xC000);
        Assert.Empty(listener.Changes);

        Config(0x04, PciConfigSpace.CommandMemorySpace);
        Assert.Equal(
        [
            new PciBarChange(3, 0, 0, PciBarKind.Memory32, 0x1000, null, 0xD000_0000),
            new PciBarChange(3, 0, 2, PciBarKind.Memory64, 0x4000, null, 0xD010_0000),
        ], listener.Changes);
        listener.Changes.Clear();

        bridge.Write(EcamOffset(3, 0, 0x04), 2, PciConfigSpace.CommandMemorySpace | PciConfigSpace.CommandIoSpace);
        Assert.Equal([new PciBarChange(3, 0, 4, PciBarKind.Io, 0x20, null, 0xC000)], listener.Changes);
        listener.Changes.Clear();

        Config(0x10, 0xD000_2000); // moved while decoding
        Assert.Equal([new PciBarChange(3, 0, 0, PciBarKind.Memory32, 0x1000, 0xD000_0000, 0xD000_2000)], listener.Changes);
        listener.Changes.Clear();

        Config(0x10, 0xD000_2000); // the same address again: no event
        Assert.Empty(listener.Changes);

        Config(0x04, 0);
        Assert.Equal(
        [
            new PciBarChange(3, 0, 0, PciBarKind.Memory32, 0x1000, 0xD000_2000, null),
            new PciBarChange(3, 0, 2, PciBarKind.Memory64, 0x4000, 0xD010_0000, null),
            new PciBarChange(3, 0, 4, PciBarKind.Io, 0x20, 0xC000, null),
        ], listener.Changes);
    }

    [Fact]
    public void Hostile_accesses_to_every_window_never_throw()
    {
        var (bridge, device) = BridgeWithDevice();
        bridge.Bus.Listener = new RecordingBarListener();
        var random = new Random(19);
        var offsets = new List<ulong> { Address, Address + 1, Address + 3, Data, Data + 1, Data + 3, Data + 4, Platform.PciEcamLength,
            Platform.PciEcamLength - 1, ulong.MaxValue, 0x2000_0000 };
        for (var i = 0; i < 2000; i++) offsets.Add((ulong)random.NextInt64(0, (long)Platform.PciEcamLength));

        foreach (var offset in offsets)
            foreach (var size in new[] { 0, 1, 2, 3, 4, 8, 16, -1 })
            {
                bridge.Read(offset, size);
                bridge.Write(offset, size, (ulong)random.NextInt64());
                bridge.Write(Address, 4, (uint)random.Next() | 0x8000_0000);
                bridge.Read(Data + (ulong)(offset & 3), size);
                bridge.Write(Data + (ulong)(offset & 3), size, ulong.MaxValue);
            }

        Assert.Equal(0x1041_1AF4u, device.Read(0, 4)); // the IDs survive
        Assert.Equal(0x0008_1B36ul, bridge.Read(EcamOffset(0, 0, 0), 4));
    }

    [Fact]
    public void State_round_trips_config_address_and_the_host_bridge()
    {
        var bridge = new PciHostBridge();
        bridge.Write(Address, 4, Cf8(0, 0, 0x3C));
        bridge.Write(Data, 1, 0x33);

        var restored = PciHostBridge.FromState(bridge.State(), new PciBus());

        Assert.Equal(bridge.ConfigAddress, restored.ConfigAddress);
        Assert.Equal(0x33ul, restored.Read(Data, 1));
    }

    [Fact]
    public void Host_bridge_restored_from_its_state_record_through_the_codec_reads_the_same()
    {
        var bridge = new PciHostBridge();
        bridge.Write(PciHostBridge.EcamWindow + 4, 2, 0x0006);                    // command: memory and bus master
        bridge.Write(PciHostBridge.ConfigAddressWindow, 4, 0x8000_0004);          // latched CONFIG_ADDRESS
        var record = ((IStatefulDevice)bridge).SaveState();
        var restored = PciHostBridge.FromState((PciHostBridgeState)DeviceStateCodec.Decode(DeviceStateCodec.Encode(record)));

        Assert.Equal(0x8000_0004UL, restored.Read(PciHostBridge.ConfigAddressWindow, 4));
        Assert.Equal(0x0006UL, restored.Read(PciHostBridge.ConfigDataWindow, 2));  // through the latched address
        Assert.Equal(bridge.Read(PciHostBridge.EcamWindow, 4), restored.Read(PciHostBridge.EcamWindow, 4));
    }

    [Fact]
    public void Host_bridge_state_with_a_configuration_space_of_the_wrong_size_is_refused()
    {
        var json = """{"type": "pci-host-bridge", "state": {"configAddress": 0, "hostBridgeConfig": "AAAAAAAAAAAAAAAAAAAAAA=="}}"""u8.ToArray();
        var e = Assert.Throws<SnapshotStateException>(() => DeviceStateCodec.Decode(json));
        Assert.Contains("4096", e.Message);
    }

    [Fact]
    public void Configuration_accesses_of_a_remote_function_are_forwarded_to_its_actor_through_both_mechanisms()
    {
        var bridge = new PciHostBridge(remote: [new PciRemoteFunction(1, 0, "virtio-rng", 0x0)]);

        bridge.Write(Address, 4, Cf8(1, 0, 0x04));
        Assert.True(bridge.TryForward(Data + 2, 2, out var device, out var offset));
        Assert.Equal(("virtio-rng", 0x06UL), (device, offset));           // lane 2 of dword 4: the status register
        Assert.False(bridge.TryForward(Data + 2, 4, out _, out _));        // past the dword's lanes: the bridge's (all ones)
        Assert.False(bridge.TryForward(Address, 4, out _, out _));         // CONFIG_ADDRESS itself
        Assert.True(bridge.TryForward(EcamOffset(1, 0, 0x10), 4, out device, out offset));
        Assert.Equal(("virtio-rng", 0x10UL), (device, offset));
        Assert.False(bridge.TryForward(EcamOffset(1, 0, 0x10), 8, out _, out _)); // not a configuration request
        Assert.False(bridge.TryForward(EcamOffset(0, 0, 0), 4, out _, out _));    // the host bridge's own
        Assert.False(bridge.TryForward(EcamOffset(2, 0, 0), 4, out _, out _));    // nobody's: reads all ones here

        bridge.Write(Address, 4, Cf8(1, 0, 0x04, enable: false));
        Assert.False(bridge.TryForward(Data, 4, out _, out _));
        bridge.Write(Address, 4, Cf8(1, 0, 0x04, bus: 1));
        Assert.False(bridge.TryForward(Data, 4, out _, out _));
    }

    [Fact]
    public void A_remote_function_cannot_take_a_slot_the_bridge_serves()
    {
        Assert.Throws<ArgumentException>(() => new PciHostBridge(remote: [new PciRemoteFunction(0, 0, "x", 0)]));
        Assert.Throws<ArgumentException>(() => new PciHostBridge(remote: [new PciRemoteFunction(1, 0, "x", 0), new PciRemoteFunction(1, 0, "y", 0)]));
    }

    [Theory]
    [InlineData(0xFEE0_1000UL, 0x0000_4041u, 0x41, DeliveryMode.Fixed, false, 1u)]
    [InlineData(0xFEE0_300CUL, 0x0000_0152u, 0x52, DeliveryMode.LowestPriority, true, 3u)]
    [InlineData(0xFEEF_F000UL, 0x0000_0400u, 0x00, DeliveryMode.Nmi, false, 0xFFu)]
    public void An_msi_message_is_the_apic_message_its_address_and_data_encode(ulong address, uint data, byte vector, DeliveryMode mode,
        bool logical, uint destination)
    {
        Assert.Equal(new ApicMessage(vector, mode, logical, destination, Level: true, LevelTriggered: false),
            MsiDecoding.ToApicMessage(new MsiMessage(address, data)));
    }

    [Theory]
    [InlineData(0xD000_0000UL, 0x41u)]           // not the APICs' range: a memory write
    [InlineData(0x1_FEE0_0000UL, 0x41u)]         // above 4 GiB
    [InlineData(0xFEE0_0000UL, 0x341u)]          // delivery mode 011b is reserved
    public void An_msi_message_outside_the_apic_range_or_with_a_reserved_mode_delivers_nothing(ulong address, uint data) =>
        Assert.Null(MsiDecoding.ToApicMessage(new MsiMessage(address, data)));
}
