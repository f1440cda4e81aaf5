using ActorVmm.Devices.Pci;
using ActorVmm.Devices.Virtio;
using static ActorVmm.Devices.Virtio.VirtioStatus;
using static ActorVmm.Devices.Virtio.VirtqFlags;

namespace ActorVmm.Devices.Tests.Virtio;

/// <summary>A virtio device type's own state inside its PCI function's record (virtio-console's pending
/// input, virtio-blk's capacity), and host input through the function to the console's receive queue.</summary>
public sealed class VirtioPciDeviceStateTests
{
    private const ulong Bar = VirtioPciFunction.BarWindow;
    private const ulong BarAddress = 0xD000_0000;
    private const ulong Data = 0x4_0000;
    private const ushort Size = 8;

    private readonly TestGuestMemory _m = new();
    private readonly DriverRing _rx;
    private readonly List<byte> _output = [];

    public VirtioPciDeviceStateTests() => _rx = new DriverRing(_m, Size);

    private VirtioPciFunction Console(VirtioConsole? console = null) =>
        new(3, console ?? new VirtioConsole(_m, b => _output.AddRange(b.ToArray())), new GuestRam(_m), NullInterruptLine.Instance, _ => { }, _ => { });

    private static void Cfg(VirtioPciFunction f, int register, int size, uint value) => f.Write(VirtioPciFunction.ConfigWindow + (ulong)register, size, value);

    private static void Common(VirtioPciFunction f, ulong register, int size, ulong value) => f.Write(Bar + VirtioPciFunction.CommonOffset + register, size, value);

    /// <summary>BAR placed, memory and bus mastering on, VERSION_1 negotiated, receiveq (queue 0) set up, DRIVER_OK.</summary>
    private void Initialise(VirtioPciFunction f, bool busMaster = true)
    {
        Cfg(f, 0x10, 4, (uint)BarAddress);
        Cfg(f, 0x14, 4, 0);
        Cfg(f, 0x04, 2, PciConfigSpace.CommandMemorySpace | (busMaster ? PciConfigSpace.CommandBusMaster : 0u));
        Common(f, 0x14, 1, 0);
        Common(f, 0x14, 1, Acknowledge | Driver);
        Common(f, 0x08, 4, 1);
        Common(f, 0x0C, 4, 1);
        Common(f, 0x14, 1, Acknowledge | Driver | FeaturesOk);
        Common(f, 0x16, 2, 0);
        Common(f, 0x18, 2, Size);
        Common(f, 0x20, 8, _rx.Desc);
        Common(f, 0x28, 8, _rx.Avail);
        Common(f, 0x30, 8, _rx.Used);
        Common(f, 0x1C, 2, 1);
        Common(f, 0x14, 1, Acknowledge | Driver | FeaturesOk | DriverOk);
    }

    private void PostReceiveBuffer(ushort head, uint length = 16)
    {
        _rx.SetDesc(head, Data + head * 0x100UL, length, DescWrite);
        _rx.MakeAvailable(head);
    }

    [Fact]
    public void Host_input_through_the_function_fills_a_posted_receive_buffer()
    {
        var f = Console();
        Initialise(f);
        PostReceiveBuffer(0);
        Assert.Equal(5, f.OfferInput("hello"u8));
        Assert.Equal(1, _rx.UsedIdx);
        Assert.Equal((0u, 5u), _rx.UsedElem(0));
        Assert.Equal("hello"u8.ToArray(), _m.Bytes(Data, 5));
    }

    [Fact]
    public void Without_bus_mastering_input_waits_in_the_device_and_touches_no_memory()
    {
        var f = Console();
        Initialise(f, busMaster: false);
        PostReceiveBuffer(0);
        Assert.Equal(2, f.OfferInput("hi"u8));
        Assert.Equal(0, _rx.UsedIdx);
        var state = Assert.IsType<VirtioPciFunctionState>(f.SaveState());
        Assert.Equal(new VirtioConsoleState([.. "hi"u8]), state.Console);
    }

    [Fact]
    public void Pending_console_input_survives_the_functions_record_through_the_codec()
    {
        var f = Console();
        Initialise(f);
        f.OfferInput("later"u8);                             // no buffer posted yet: held by the device
        var state = Assert.IsType<VirtioPciFunctionState>(DeviceStateCodec.Decode(DeviceStateCodec.Encode(f.SaveState())));
        Assert.Equal(new VirtioConsoleState([.. "later"u8]), state.Console);
        Assert.Null(state.Blk);

        var restored = VirtioPciFunction.FromState(state, VirtioConsole.FromState(state.Console!, _m, _ => { }), new GuestRam(_m),
            NullInterruptLine.Instance, _ => { }, _ => { });
        PostReceiveBuffer(0);
        restored.Write(Bar + VirtioPciFunction.NotifyOffset, 2, 0); // the driver notifies receiveq
        Assert.Equal((0u, 5u), _rx.UsedElem(0));
        Assert.Equal("later"u8.ToArray(), _m.Bytes(Data, 5));
    }

    [Fact]
    public void A_device_without_input_takes_none()
    {
        var rng = new VirtioPciFunction(1, new VirtioRng(_m, s => s.Fill(1)), new GuestRam(_m), NullInterruptLine.Instance, _ => { }, _ => { });
        Assert.Equal(0, rng.OfferInput("x"u8));
        var state = (VirtioPciFunctionState)rng.SaveState();
        Assert.Null(state.Console);
        Assert.Null(state.Blk);
    }

    [Fact]
    public void A_record_whose_device_state_belongs_to_another_device_type_is_refused()
    {
        var rng = new VirtioPciFunction(1, new VirtioRng(_m, s => s.Fill(1)), new GuestRam(_m), NullInterruptLine.Instance, _ => { }, _ => { });
        var state = (VirtioPciFunctionState)rng.SaveState();
        var e = Assert.Throws<SnapshotStateException>(() => DeviceStateCodec.Encode(state with { Blk = new VirtioBlkState(8) }));
        Assert.Contains("virtio device 4 has no virtio-blk state", e.Message);
        e = Assert.Throws<SnapshotStateException>(() => DeviceStateCodec.Encode(state with { Console = new VirtioConsoleState([]) }));
        Assert.Contains("virtio device 4 has no virtio-console state", e.Message);
    }

    [Fact]
    public void A_virtio_blk_functions_record_keeps_the_capacity_the_driver_was_told()
    {
        var path = Path.GetTempFileName();
        try
        {
            File.WriteAllBytes(path, new byte[8 * 512]);
            using var disk = FileBlockBackend.Open(path, readOnly: false);
            var f = new VirtioPciFunction(2, new VirtioBlk(_m, disk, "d", () => 0), new GuestRam(_m), NullInterruptLine.Instance, _ => { }, _ => { });
            var state = Assert.IsType<VirtioPciFunctionState>(DeviceStateCodec.Decode(DeviceStateCodec.Encode(f.SaveState())));
            Assert.Equal(new VirtioBlkState(8), state.Blk);
            Assert.Null(state.Console);
        }
        finally
        {
            File.Delete(path);
        }
    }
}
