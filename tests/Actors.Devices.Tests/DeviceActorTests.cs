using Akka.Actor;
using Akka.TestKit.Xunit2;
using static ActorVmm.Devices.DeviceProtocol;

namespace ActorVmm.Devices.Tests;

public sealed class DeviceActorTests : TestKit
{
    private static readonly TimeSpan Quiet = TimeSpan.FromMilliseconds(200);

    /// <summary>Returns a fixed wide value and counts accesses, to see what the actor passes through.</summary>
    private sealed class WideDevice : IBusDevice
    {
        public const ulong Value = 0x1122_3344_5566_7788;
        public int Reads;
        public int Writes;

        public ulong Read(ulong offset, int size)
        {
            Reads++;
            return Value;
        }

        public void Write(ulong offset, int size, ulong value) => Writes++;
    }

    private IActorRef Uart(out Uart16550 model, IActorRef? events = null)
    {
        Uart16550? created = null;
        var actor = Sys.ActorOf(Props("uart0", _ => created = new Uart16550(NullInterruptLine.Instance, _ => { }), events ?? ActorRefs.Nobody));
        // Props are built lazily; a round trip guarantees the factory has run.
        actor.Tell(new Read(0, 7, 1), TestActor);
        ExpectMsg<ReadResult>();
        model = created!;
        return actor;
    }

    /// <summary>Throws on the first read (a model bug), then behaves.</summary>
    private sealed class FlakyDevice : IBusDevice
    {
        public static int Instances;
        private static int _failures;

        public FlakyDevice() => Interlocked.Increment(ref Instances);

        public ulong Read(ulong offset, int size) =>
            Interlocked.Increment(ref _failures) == 1 ? throw new InvalidOperationException("model bug") : 0x17UL;

        public void Write(ulong offset, int size, ulong value) => throw new InvalidOperationException("model bug");
    }

    [Fact]
    public async Task DeviceActor_must_answer_a_read_even_when_its_model_throws_and_then_restart()
    {
        var actor = Sys.ActorOf(Props("flaky", _ => new FlakyDevice(), ActorRefs.Nobody));

        actor.Tell(new Read(1, 0, 2), TestActor);
        Assert.Equal(new ReadResult(1, 0xFFFF), await ExpectMsgAsync<ReadResult>());

        actor.Tell(new Read(2, 0, 1), TestActor);
        Assert.Equal(new ReadResult(2, 0x17), await ExpectMsgAsync<ReadResult>());
        Assert.Equal(2, FlakyDevice.Instances); // restarted with a fresh model

        // Writes that throw are still credited: the vcpu's write window does not leak.
        for (var i = 0; i < CreditBatch; i++) actor.Tell(new Write(0, 1, 0), TestActor);
        Assert.Equal(new WriteCredit(1), await ExpectMsgAsync<WriteCredit>());
    }

    [Fact]
    public async Task DeviceActor_must_answer_reads_with_the_correlation_id()
    {
        var actor = Uart(out _);

        actor.Tell(new Write(7, 1, 0xA5), TestActor); // SCR
        actor.Tell(new Read(42, 7, 1), TestActor);
        actor.Tell(new Read(43, 5, 1), TestActor); // LSR

        Assert.Equal(new ReadResult(42, 0xA5), await ExpectMsgAsync<ReadResult>());
        Assert.Equal(new ReadResult(43, 0x60), await ExpectMsgAsync<ReadResult>());
    }

    [Fact]
    public async Task DeviceActor_must_credit_posted_writes_in_batches_of_64()
    {
        var actor = Uart(out _);

        for (var i = 0; i < CreditBatch - 1; i++) actor.Tell(new Write(7, 1, (ulong)i), TestActor);
        await ExpectNoMsgAsync(Quiet);

        actor.Tell(new Write(7, 1, 0), TestActor);
        Assert.Equal(new WriteCredit(CreditBatch), await ExpectMsgAsync<WriteCredit>());
        await ExpectNoMsgAsync(Quiet);
    }

    [Fact]
    public async Task DeviceActor_must_keep_credits_per_sender()
    {
        var actor = Uart(out _);
        var other = CreateTestProbe();

        for (var i = 0; i < CreditBatch - 1; i++) actor.Tell(new Write(7, 1, 0), TestActor);
        actor.Tell(new Write(7, 1, 0), other.Ref);

        await ExpectNoMsgAsync(Quiet);
        await other.ExpectNoMsgAsync(Quiet);
    }

    [Fact]
    public async Task DeviceActor_must_mask_read_values_to_the_access_size()
    {
        var device = new WideDevice();
        var actor = Sys.ActorOf(Props("wide", _ => device, ActorRefs.Nobody));

        actor.Tell(new Read(1, 0, 1), TestActor);
        actor.Tell(new Read(2, 0, 2), TestActor);
        actor.Tell(new Read(4, 0, 4), TestActor);
        actor.Tell(new Read(8, 0, 8), TestActor);

        Assert.Equal(new ReadResult(1, 0x88), await ExpectMsgAsync<ReadResult>());
        Assert.Equal(new ReadResult(2, 0x7788), await ExpectMsgAsync<ReadResult>());
        Assert.Equal(new ReadResult(4, 0x5566_7788), await ExpectMsgAsync<ReadResult>());
        Assert.Equal(new ReadResult(8, WideDevice.Value), await ExpectMsgAsync<ReadResult>());
    }

    [Fact]
    public async Task DeviceActor_must_answer_an_invalid_size_with_all_ones_without_touching_the_model()
    {
        var device = new WideDevice();
        var actor = Sys.ActorOf(Props("wide", _ => device, ActorRefs.Nobody));

        actor.Tell(new Read(3, 0, 3), TestActor);
        Assert.Equal(new ReadResult(3, 0xFF_FFFF), await ExpectMsgAsync<ReadResult>());

        actor.Tell(new Write(0, 3, 0), TestActor);
        actor.Tell(new Read(4, 0, 1), TestActor); // still alive, same incarnation
        Assert.Equal(new ReadResult(4, 0x88), await ExpectMsgAsync<ReadResult>());
        Assert.Equal(1, device.Reads);
        Assert.Equal(0, device.Writes);
    }

    [Fact]
    public async Task DeviceActor_must_report_debug_exit_to_the_events_target()
    {
        var events = CreateTestProbe();
        var actor = Sys.ActorOf(Props("debug-exit", e => new DebugExit(e), events.Ref));

        actor.Tell(new Write(0, 1, 3), TestActor);

        Assert.Equal(new GuestExitRequested("debug-exit", 7, "debug-exit"), await events.ExpectMsgAsync<GuestExitRequested>());
        await ExpectNoMsgAsync(Quiet);
    }

    [Fact]
    public async Task DeviceActor_must_answer_a_waited_write_saying_whether_it_ended_the_machine()
    {
        var events = CreateTestProbe();
        var actor = Sys.ActorOf(Props("i8042", e => new I8042(e), events.Ref));

        actor.Tell(new WriteAndWait(1, 4, 1, 0xAA), TestActor); // self test: the machine goes on
        Assert.Equal(new WriteDone(1, MachineEnding: false), await ExpectMsgAsync<WriteDone>());
        actor.Tell(new WriteAndWait(2, 4, 1, 0xFE), TestActor); // pulse the reset line
        // The VM hears of the reset before the vcpu hears the write is done.
        Assert.Equal("i8042", (await events.ExpectMsgAsync<GuestResetRequested>()).Device);
        Assert.Equal(new WriteDone(2, MachineEnding: true), await ExpectMsgAsync<WriteDone>());
        actor.Tell(new WriteAndWait(3, 0, 1, 0x00), TestActor);
        Assert.Equal(new WriteDone(3, MachineEnding: false), await ExpectMsgAsync<WriteDone>());
    }

    [Fact]
    public async Task DeviceActor_must_report_an_acpi_power_off_and_answer_its_write_as_machine_ending()
    {
        var events = CreateTestProbe();
        var actor = Sys.ActorOf(Props("acpi-pm", e => new AcpiPm(new ManualClock(), e), events.Ref));

        actor.Tell(new WriteAndWait(1, AcpiPm.ControlOffset, 2, AcpiPm.SleepEnable | (AcpiPm.SleepTypeS5 << AcpiPm.SleepTypeShift)), TestActor);

        Assert.Equal(new GuestPowerOffRequested("acpi-pm", "ACPI S5: PM1a_CNT SLP_TYP 7 with SLP_EN"),
            await events.ExpectMsgAsync<GuestPowerOffRequested>());
        Assert.Equal(new WriteDone(1, MachineEnding: true), await ExpectMsgAsync<WriteDone>());
    }

    [Fact]
    public async Task DeviceActor_must_report_i8042_reset_to_the_events_target()
    {
        var events = CreateTestProbe();
        var actor = Sys.ActorOf(Props("i8042", e => new I8042(e), events.Ref));

        actor.Tell(new Write(4, 1, 0xFE), TestActor);

        Assert.Equal(new GuestResetRequested("i8042", "i8042 reset"), await events.ExpectMsgAsync<GuestResetRequested>());
    }

    [Fact]
    public async Task DeviceActor_must_hold_host_input_until_the_uart_has_room()
    {
        var actor = Uart(out var model);
        actor.Tell(new Write(2, 1, 0x01), TestActor); // FCR: FIFOs on, 16 bytes
        var input = Enumerable.Range(0, 20).Select(i => (byte)('a' + i)).ToArray();

        actor.Tell(new HostInput(input), TestActor);
        actor.Tell(new Read(100, 5, 1), TestActor); // LSR: a round trip, and DR must be set
        Assert.Equal(0x61UL, (await ExpectMsgAsync<ReadResult>()).Value);
        Assert.Equal(input[..16], model.State().RxFifo.ToArray()); // the other 4 wait in the actor

        var received = new List<byte>();
        for (var i = 0; i < 20; i++)
        {
            actor.Tell(new Read(i, 0, 1), TestActor);
            var result = await ExpectMsgAsync<ReadResult>();
            Assert.Equal(i, result.Id);
            received.Add((byte)result.Value);
        }

        Assert.Equal(input, received);
        actor.Tell(new Read(200, 5, 1), TestActor);
        Assert.Equal(0x60UL, (await ExpectMsgAsync<ReadResult>()).Value); // nothing left
    }

    [Fact]
    public async Task DeviceActor_must_count_accesses()
    {
        var actor = Uart(out _); // one read already

        actor.Tell(new Write(7, 1, 1), TestActor);
        actor.Tell(GetStats.Instance, TestActor);

        Assert.Equal(new Stats("uart0", 1, 1), await ExpectMsgAsync<Stats>());
    }

    /// <summary>Flushes the page a write names (pc-testdev's flush port, reduced to that).</summary>
    private sealed class FlushingDevice(IPlatformEvents events) : IBusDevice
    {
        public ulong Read(ulong offset, int size) => 0;
        public void Write(ulong offset, int size, ulong value) => events.RequestPageFlush(value);
    }

    [Fact]
    public async Task DeviceActor_must_answer_a_waited_write_only_after_the_memory_owner_completed_its_page_flush()
    {
        var memory = CreateTestProbe();
        var actor = Sys.ActorOf(DeviceProtocol.Props("flusher", e => new FlushingDevice(e), null, ActorRefs.Nobody, memory.Ref));

        actor.Tell(new WriteAndWait(1, 0, 4, 0x5000), TestActor);
        var flush = await memory.ExpectMsgAsync<FlushGuestPage>();
        Assert.Equal(("flusher", 0x5000UL), (flush.Device, flush.Gpa));
        await ExpectNoMsgAsync(Quiet); // the guest must not go on before the page is flushed

        memory.Reply(new Completed(flush.Id));
        Assert.Equal(new WriteDone(1, MachineEnding: false), await ExpectMsgAsync<WriteDone>());
    }

    [Fact]
    public async Task DeviceActor_must_answer_a_waited_write_at_once_when_it_has_no_memory_owner()
    {
        var actor = Sys.ActorOf(DeviceProtocol.Props("flusher", e => new FlushingDevice(e), ActorRefs.Nobody));

        actor.Tell(new WriteAndWait(1, 0, 4, 0x5000), TestActor);

        Assert.Equal(new WriteDone(1, MachineEnding: false), await ExpectMsgAsync<WriteDone>());
    }

    /// <summary>Sends a barrier to each of <paramref name="targets"/> on every write, as the host's
    /// synced interrupt lines do after a change.</summary>
    private sealed class SyncingDevice(IPlatformEvents events, IActorRef[] targets) : IBusDevice
    {
        public ulong Read(ulong offset, int size) => 0;

        public void Write(ulong offset, int size, ulong value)
        {
            foreach (var t in targets) ((IDeviceRequests)events).Send(t, id => new Sync(id));
        }
    }

    [Fact]
    public async Task DeviceActor_must_hold_waited_writes_in_order_until_every_earlier_request_is_answered()
    {
        var a = CreateTestProbe();
        var b = CreateTestProbe();
        var actor = Sys.ActorOf(DeviceProtocol.Props("lines", e => new SyncingDevice(e, [a.Ref, b.Ref]), ActorRefs.Nobody));

        actor.Tell(new WriteAndWait(1, 0, 1, 1), TestActor);
        actor.Tell(new WriteAndWait(2, 0, 1, 0), TestActor);
        var a1 = await a.ExpectMsgAsync<Sync>();
        var b1 = await b.ExpectMsgAsync<Sync>();
        var a2 = await a.ExpectMsgAsync<Sync>();
        var b2 = await b.ExpectMsgAsync<Sync>();

        b.Reply(new Completed(b2.Id));
        b.Reply(new Completed(b1.Id));
        a.Reply(new Completed(a2.Id));
        await ExpectNoMsgAsync(Quiet); // write 1 still waits for a's first answer, and write 2 behind it
        a.Reply(new Completed(a1.Id));
        Assert.Equal(new WriteDone(1, false), await ExpectMsgAsync<WriteDone>());
        Assert.Equal(new WriteDone(2, false), await ExpectMsgAsync<WriteDone>());
    }

    [Fact]
    public async Task DeviceActor_must_answer_a_sync_after_what_the_sender_told_it_before()
    {
        var actor = Uart(out var model);

        actor.Tell(new Write(3, 1, 0x03), TestActor); // LCR: 8 data bits
        actor.Tell(new Sync(42), TestActor);

        Assert.Equal(new Completed(42), await ExpectMsgAsync<Completed>());
        Assert.Equal(0x03UL, model.Read(3, 1));
    }

    [Fact]
    public async Task DeviceActor_must_answer_its_held_writes_when_it_restarts()
    {
        var memory = CreateTestProbe();
        var actor = Sys.ActorOf(DeviceProtocol.Props("flusher", e => new FlushingDevice(e), null, ActorRefs.Nobody, memory.Ref));
        actor.Tell(new WriteAndWait(1, 0, 4, 0x5000), TestActor);
        var flush = await memory.ExpectMsgAsync<FlushGuestPage>();

        actor.Tell(new FaultProtocol.Crash("test"));

        Assert.Equal(new WriteDone(1, false), await ExpectMsgAsync<WriteDone>()); // never left waiting
        await memory.ExpectMsgAsync<DeviceRestarting>();
        memory.Reply(new Completed(flush.Id)); // late: completes nothing of the new incarnation
        actor.Tell(new WriteAndWait(2, 0, 4, 0x6000), TestActor);
        var next = await memory.ExpectMsgAsync<FlushGuestPage>();
        Assert.NotEqual(flush.Id, next.Id);
        await ExpectNoMsgAsync(Quiet);
        memory.Reply(new Completed(next.Id));
        Assert.Equal(new WriteDone(2, false), await ExpectMsgAsync<WriteDone>());
    }

    /// <summary>A function's configuration space as a register file: reads give back what was written.</summary>
    private sealed class Registers : IBusDevice
    {
        public readonly Dictionary<ulong, ulong> Written = [];
        public ulong Read(ulong offset, int size) => Written.GetValueOrDefault(offset, 0xAB00 + offset);
        public void Write(ulong offset, int size, ulong value) => Written[offset] = value;
    }

    [Fact]
    public async Task DeviceActor_must_forward_a_remote_functions_config_data_accesses_to_its_actor_which_answers_the_sender()
    {
        var function = new Registers();
        Sys.ActorOf(Props("fn", _ => function, ActorRefs.Nobody), "fn");
        var bridge = Sys.ActorOf(Props("pci", _ => new ActorVmm.Devices.Pci.PciHostBridge(remote: [new ActorVmm.Devices.Pci.PciRemoteFunction(1, 0, "fn", 0x100)]),
            ActorRefs.Nobody), "pci");

        bridge.Tell(new Write(ActorVmm.Devices.Pci.PciHostBridge.ConfigAddressWindow, 4, 0x8000_0804), TestActor); // 00:01.0, register 4
        bridge.Tell(new Read(1, ActorVmm.Devices.Pci.PciHostBridge.ConfigDataWindow + 2, 2), TestActor);
        Assert.Equal(new ReadResult(1, 0xAB00 + 0x106), await ExpectMsgAsync<ReadResult>());
        Assert.Equal(Sys.ActorSelection("/user/fn").ResolveOne(TimeSpan.FromSeconds(3)).Result, LastSender); // the function answered

        bridge.Tell(new WriteAndWait(2, ActorVmm.Devices.Pci.PciHostBridge.ConfigDataWindow, 4, 0x0006), TestActor);
        Assert.Equal(new WriteDone(2, false), await ExpectMsgAsync<WriteDone>());
        Assert.Equal(0x0006UL, function.Written[0x104]);

        bridge.Tell(new Write(ActorVmm.Devices.Pci.PciHostBridge.ConfigAddressWindow, 4, 0x8000_0000), TestActor); // 00:00.0: the bridge's own
        bridge.Tell(new Read(3, ActorVmm.Devices.Pci.PciHostBridge.ConfigDataWindow, 4), TestActor);
        Assert.Equal(new ReadResult(3, 0x0008_1B36), await ExpectMsgAsync<ReadResult>());
        Assert.Equal(bridge, LastSender);
    }
}
