using System.Collections.Immutable;
using ActorVmm.Devices.Virtio;
using ActorVmm.LibVmm;
using static ActorVmm.Devices.Virtio.VirtqFlags;

namespace ActorVmm.Devices.Tests.Virtio;

/// <summary>
/// virtio-console port 0 (virtio 1.2 §5.3) with its receiveq and transmitq built in
/// <see cref="TestGuestMemory"/> as a driver would.
/// </summary>
public sealed class VirtioConsoleTests
{
    private const ushort Size = 16;
    private const ulong Data = 0x4_0000;

    private readonly TestGuestMemory _m = new();
    private readonly DriverRing _rx;
    private readonly DriverRing _tx;
    private readonly List<byte> _output = [];
    private readonly List<int> _pieces = [];
    private VirtioConsole _console;
    private SplitVirtqueue _rxq;
    private SplitVirtqueue _txq;

    public VirtioConsoleTests()
    {
        _rx = new DriverRing(_m, Size);
        _tx = new DriverRing(_m, Size, desc: 0x1_8000, avail: 0x2_8000, used: 0x3_8000);
        _console = new VirtioConsole(_m, Sink);
        _rxq = Enable(_rx);
        _txq = Enable(_tx);
    }

    private void Sink(ReadOnlySpan<byte> bytes)
    {
        _output.AddRange(bytes);
        _pieces.Add(bytes.Length);
    }

    private SplitVirtqueue Enable(DriverRing r) =>
        SplitVirtqueue.Enable(new GuestRam(_m), r.Size, new GuestPhysAddr(r.Desc), new GuestPhysAddr(r.Avail),
            new GuestPhysAddr(r.Used), VirtioFeatures.Version1 | VirtioFeatures.EventIdx);

    private void Receive() => _console.Process(VirtioConsole.ReceiveQueue, _rxq);

    private void Transmit() => _console.Process(VirtioConsole.TransmitQueue, _txq);

    /// <summary>Posts a one-descriptor receive buffer (descriptor <paramref name="index"/>).</summary>
    private void PostReceive(ushort index, ulong at, uint length)
    {
        _m.Fill(at, (int)length + 1, 0xEE);
        _rx.SetDesc(index, at, length, DescWrite);
        _rx.MakeAvailable(index);
    }

    private void Put(ulong at, ReadOnlySpan<byte> bytes) => Assert.True(_m.TryWrite(new GuestPhysAddr(at), bytes));

    [Fact]
    public void Identifies_as_a_console_with_a_receive_and_a_transmit_queue_and_no_features()
    {
        Assert.Equal(3, _console.DeviceId);
        Assert.Equal([VirtioConsole.QueueSize, VirtioConsole.QueueSize], _console.QueueMaxSizes);
        Assert.Equal(0UL, _console.Features);
        Assert.Equal(12, _console.ConfigLength);
        Assert.Equal(0UL, _console.ReadConfig(0, 4));
        Assert.Equal(0UL, _console.ReadConfig(8, 4));
    }

    [Fact]
    public void Transmitted_bytes_go_to_the_sink_in_chain_order_and_the_chains_return_with_length_zero()
    {
        Put(Data, "hello, "u8);
        Put(Data + 0x100, "world"u8);
        Put(Data + 0x200, "!\n"u8);
        _tx.SetDesc(0, Data, 7, DescNext, 1);
        _tx.SetDesc(1, Data + 0x100, 5);
        _tx.SetDesc(2, Data + 0x200, 2);
        _tx.MakeAvailable(0);
        _tx.MakeAvailable(2);

        Transmit();

        Assert.Equal("hello, world!\n"u8.ToArray(), _output);
        Assert.Equal(2, _tx.UsedIdx);
        Assert.Equal([(0u, 0u), (2u, 0u)], [_tx.UsedElem(0), _tx.UsedElem(1)]);
        Assert.Equal(2, _tx.AvailEvent); // §2.7.10: notify at the next available chain
    }

    [Fact]
    public void A_large_transmit_buffer_reaches_the_sink_whole_in_bounded_pieces_and_writable_buffers_are_ignored()
    {
        var big = Enumerable.Range(0, 10_000).Select(i => (byte)i).ToArray();
        Put(Data, big);
        _m.Fill(0x8_0000, 16, 0xEE);
        _tx.SetDesc(0, Data, (uint)big.Length, DescNext, 1);
        _tx.SetDesc(1, 0x8_0000, 16, DescWrite); // §5.3.6.1: the driver MUST NOT; the device writes nothing there
        _tx.MakeAvailable(0);

        Transmit();

        Assert.Equal(big, _output);
        Assert.All(_pieces, n => Assert.InRange(n, 1, VirtioConsole.OutputChunk));
        Assert.Equal((0u, 0u), _tx.UsedElem(0));
        Assert.Equal(Enumerable.Repeat((byte)0xEE, 16), _m.Bytes(0x8_0000, 16));
    }

    [Fact]
    public void Input_after_buffers_are_posted_fills_them_in_order()
    {
        PostReceive(0, Data, 4);
        PostReceive(1, Data + 0x100, 64);
        Receive(); // nothing to deliver: no buffer is taken
        Assert.Equal(0, _rx.UsedIdx);

        Assert.Equal(6, _console.Input("abcdef"u8));
        Assert.True(_console.HasPendingInput);
        Receive();

        Assert.Equal(2, _rx.UsedIdx);
        Assert.Equal([(0u, 4u), (1u, 2u)], [_rx.UsedElem(0), _rx.UsedElem(1)]);
        Assert.Equal("abcd"u8.ToArray(), _m.Bytes(Data, 4));
        Assert.Equal(0xEE, _m.Bytes(Data + 4, 1)[0]);
        Assert.Equal("ef"u8.ToArray(), _m.Bytes(Data + 0x100, 2));
        Assert.Equal(0xEE, _m.Bytes(Data + 0x102, 1)[0]);
        Assert.False(_console.HasPendingInput);
    }

    [Fact]
    public void Input_before_any_buffer_is_held_until_the_driver_posts_one()
    {
        Assert.Equal(3, _console.Input("xyz"u8));
        Receive();
        Assert.Equal(0, _rx.UsedIdx);
        Assert.Equal(3, _console.PendingInput);

        PostReceive(0, Data, 2);
        Receive(); // the driver's notification
        Assert.Equal(1, _rx.UsedIdx);
        Assert.Equal((0u, 2u), _rx.UsedElem(0));
        Assert.Equal("xy"u8.ToArray(), _m.Bytes(Data, 2));
        Assert.Equal(1, _console.PendingInput);
        Assert.Equal(1, _rx.AvailEvent); // input left: asks for the driver's next notification (§2.7.10)

        PostReceive(1, Data + 0x100, 2);
        Receive();
        Assert.Equal((1u, 1u), _rx.UsedElem(1));
        Assert.Equal("z"u8.ToArray(), _m.Bytes(Data + 0x100, 1));
        Assert.Equal(0xEE, _m.Bytes(Data + 0x101, 1)[0]);
        Assert.Equal(0, _console.PendingInput);
    }

    [Fact]
    public void Input_beyond_the_bound_is_not_taken_and_is_taken_again_once_delivered()
    {
        var first = new byte[VirtioConsole.MaxPendingInput - 10];
        Assert.Equal(first.Length, _console.Input(first));
        Assert.Equal(10, _console.Input(new byte[100]));
        Assert.Equal(0, _console.Input(new byte[1]));
        Assert.Equal(VirtioConsole.MaxPendingInput, _console.PendingInput);

        PostReceive(0, Data, 0x1000);
        Receive();

        Assert.Equal((0u, 0x1000u), _rx.UsedElem(0));
        Assert.Equal(VirtioConsole.MaxPendingInput - 0x1000, _console.PendingInput);
        Assert.Equal(0x1000, _console.Input(new byte[0x2000]));
        Assert.Equal(0, ((IHostInput)_console).OfferInput("q"u8));
    }

    [Fact]
    public void A_receive_chain_without_a_writable_buffer_is_returned_empty_and_takes_no_input()
    {
        _rx.SetDesc(0, Data, 8); // device-readable: §5.3.6.1 forbids it in a receiveq
        _rx.MakeAvailable(0);
        PostReceive(1, Data + 0x100, 8);
        _console.Input("ok"u8);

        Receive();

        Assert.Equal([(0u, 0u), (1u, 2u)], [_rx.UsedElem(0), _rx.UsedElem(1)]);
        Assert.Equal("ok"u8.ToArray(), _m.Bytes(Data + 0x100, 2));
    }

    [Fact]
    public void A_receive_buffer_outside_ram_breaks_the_queue_and_keeps_the_input()
    {
        _rx.SetDesc(0, TestGuestMemory.RamSize - 4, 8, DescWrite);
        _rx.MakeAvailable(0);
        _console.Input("abc"u8);

        Receive();

        Assert.Equal(VirtqueueError.BufferOutsideRam, _rxq.Error);
        Assert.Equal(0, _rx.UsedIdx);
        Assert.Equal(3, _console.PendingInput);
        Assert.Equal(0, _m.AccessesOutside);
        Assert.Equal(0, _m.RomWrites);
    }

    [Fact]
    public void Reset_drops_the_pending_input()
    {
        _console.Input("stale"u8);

        _console.Reset();

        Assert.Equal(0, _console.PendingInput);
    }

    [Fact]
    public void A_model_rebuilt_from_its_state_delivers_the_pending_input_once_and_transmits_no_chain_twice()
    {
        Put(Data + 0x800, "one"u8);
        _tx.SetDesc(0, Data + 0x800, 3);
        _tx.MakeAvailable(0);
        Transmit();
        PostReceive(0, Data, 4);
        _console.Input("0123456789"u8);
        Receive(); // "0123" delivered, "456789" pending
        Put(Data + 0x900, "two"u8);
        _tx.SetDesc(1, Data + 0x900, 3);
        _tx.MakeAvailable(1);

        var state = Assert.IsType<VirtioConsoleState>(DeviceStateCodec.Decode(DeviceStateCodec.Encode(_console.State())));
        Assert.Equal(new VirtioConsoleState([.. "456789"u8]), state);
        _console = VirtioConsole.FromState(state, _m, Sink);
        _rxq = SplitVirtqueue.FromState(new GuestRam(_m), _rxq.State(), VirtioFeatures.Version1 | VirtioFeatures.EventIdx);
        _txq = SplitVirtqueue.FromState(new GuestRam(_m), _txq.State(), VirtioFeatures.Version1 | VirtioFeatures.EventIdx);
        PostReceive(1, Data + 0x100, 16);
        Receive();
        Transmit();

        Assert.Equal("456789"u8.ToArray(), _m.Bytes(Data + 0x100, 6));
        Assert.Equal((1u, 6u), _rx.UsedElem(1));
        Assert.Equal("onetwo"u8.ToArray(), _output);
        Assert.Equal(2, _tx.UsedIdx);
    }

    [Fact]
    public void A_state_with_more_pending_input_than_the_bound_is_refused()
    {
        var state = new VirtioConsoleState(ImmutableArray.Create(new byte[VirtioConsole.MaxPendingInput + 1]));

        Assert.NotNull(VirtioConsole.StateProblem(state));
        Assert.Throws<SnapshotStateException>(() => DeviceStateCodec.Encode(state));
        Assert.Throws<ArgumentException>(() => VirtioConsole.FromState(state, _m, Sink));
    }
}
