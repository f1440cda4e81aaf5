using Akka.Actor;
using Akka.TestKit;
using Akka.TestKit.Xunit2;
using ActorVmm.Devices;
using ActorVmm.LibVmm;
using ActorVmm.Lapic;
using Xunit.Abstractions;
using static ActorVmm.Vcpu.VcpuProtocol;

namespace ActorVmm.Vcpu.Tests;

/// <summary>
/// The vcpu actor driven by a <see cref="ScriptedVcpu"/>: a device probe on ports 0x3F8-0x3FF
/// ("uart") and one on MMIO 0xFEB0_0000-0xFEB0_0FFF ("mmio"), a probe for the VM.
/// </summary>
public sealed class VcpuActorTests : TestKit
{
    private const ushort UartBase = 0x3F8;
    private const ulong MmioBase = 0xFEB0_0000;
    private static readonly TimeSpan Quiet = TimeSpan.FromMilliseconds(200);

    private readonly List<(IActorRef Actor, ScriptedVcpu Fake)> _started = [];

    static VcpuActorTests()
    {
        // A blocked Run holds a pool thread (default dispatcher), as KVM_RUN holds the vcpu
        // thread; on a 2-core machine the pool would otherwise grow slowly around it.
        ThreadPool.GetMinThreads(out var workers, out var io);
        ThreadPool.SetMinThreads(Math.Max(workers, 32), io);
    }

    public VcpuActorTests(ITestOutputHelper output) : base(VcpuProtocol.DefaultConfig, output)
    {
    }

    private sealed record Rig(ScriptedVcpu Fake, IActorRef Vcpu, TestProbe Uart, TestProbe Mmio, TestProbe Vm, TestProbe Exit);

    /// <summary>A device whose writes can end the machine (debug-exit style): the vcpu waits for them.</summary>
    private const ushort ExitPort = 0xF4;

    /// <summary>Builds the wiring and the actor; with <paramref name="start"/> waits until it is in the guest.</summary>
    private Rig Create(bool start = true, int id = 0, bool pinned = false)
    {
        var fake = new ScriptedVcpu(id);
        var uart = CreateTestProbe("uart");
        var mmio = CreateTestProbe("mmio");
        var vm = CreateTestProbe("vm");
        var exit = CreateTestProbe("exit");
        // One bus per vcpu: a DeviceRoute carries that vcpu's count of uncredited writes.
        var wiring = new Wiring(
            AddressBus<DeviceRoute>.Empty.Insert(new DeviceRoute("uart", uart.Ref), UartBase, 8)
                .Insert(new DeviceRoute("exit", exit.Ref, waitForWrites: true), ExitPort, 1),
            AddressBus<DeviceRoute>.Empty.Insert(new DeviceRoute("mmio", mmio.Ref), MmioBase, 0x1000),
            vm.Ref,
            null);
        var props = pinned ? VcpuProtocol.Props(fake, wiring) : PropsForTest(fake, wiring);
        var actor = Sys.ActorOf(props, $"vcpu-{id}");
        _started.Add((actor, fake));
        if (start)
        {
            actor.Tell(Start.Instance);
            Assert.True(fake.WaitUntilIdleInGuest(), "the vcpu did not enter the guest after Start");
        }
        return new Rig(fake, actor, uart, mmio, vm, exit);
    }

    private static VmExit.Io Out(ushort port, ulong value, int size = 1) => new(true, port, size, 1, value, null);

    private static VmExit.Io In(ushort port, int size = 1, uint count = 1) => new(false, port, size, count, 0, null);

    protected override void Dispose(bool disposing)
    {
        // Every vcpu leaves the guest for good before the system shuts down: Stop kicks a
        // blocked Run, Dispose makes any later Run return at once.
        foreach (var (actor, fake) in _started)
        {
            actor.Tell(Stop.Instance, ActorRefs.NoSender);
            fake.Dispose();
        }
        base.Dispose(disposing);
    }

    // ---- running and posted writes ----

    [Fact]
    public async Task Vcpu_must_post_a_write_at_the_device_offset_and_run_on()
    {
        var rig = Create();
        var runs = rig.Fake.Runs;

        rig.Fake.Supply(Out(UartBase + 3, 0x83));

        Assert.Equal(new DeviceProtocol.Write(3, 1, 0x83), await rig.Uart.ExpectMsgAsync<DeviceProtocol.Write>());
        Assert.True(rig.Fake.WaitUntil(v => v.Runs == runs + 1 && v.InRun), "the vcpu did not run on after the write");
        await rig.Uart.ExpectNoMsgAsync(Quiet);
    }

    [Fact]
    public async Task Vcpu_must_post_writes_without_waiting()
    {
        var rig = Create();

        for (var i = 0; i < 5; i++) rig.Fake.Supply(Out(UartBase, (ulong)('a' + i)));

        for (var i = 0; i < 5; i++)
            Assert.Equal(new DeviceProtocol.Write(0, 1, (ulong)('a' + i)), await rig.Uart.ExpectMsgAsync<DeviceProtocol.Write>());
        Assert.True(rig.Fake.WaitUntil(v => v.Consumed == 5 && v.IdleInGuest), "the vcpu waited for a reply to a posted write");
    }

    [Fact]
    public async Task Vcpu_must_post_every_element_of_a_rep_outs()
    {
        var rig = Create();

        rig.Fake.Supply(new VmExit.Io(true, UartBase, 2, 3, 0x2211, [0x11, 0x22, 0x33, 0x44, 0x55, 0x66]));

        Assert.Equal(new DeviceProtocol.Write(0, 2, 0x2211), await rig.Uart.ExpectMsgAsync<DeviceProtocol.Write>());
        Assert.Equal(new DeviceProtocol.Write(0, 2, 0x4433), await rig.Uart.ExpectMsgAsync<DeviceProtocol.Write>());
        Assert.Equal(new DeviceProtocol.Write(0, 2, 0x6655), await rig.Uart.ExpectMsgAsync<DeviceProtocol.Write>());
        Assert.True(rig.Fake.WaitUntilIdleInGuest());
    }

    [Fact]
    public async Task Vcpu_must_wait_for_a_write_to_a_machine_ending_device_and_run_on_when_the_machine_goes_on()
    {
        var rig = Create();
        var runs = rig.Fake.Runs;
        rig.Fake.Supply(Out(ExitPort, 3));

        var write = await rig.Exit.ExpectMsgAsync<DeviceProtocol.WriteAndWait>();
        Assert.Equal((0UL, 1, 3UL), (write.Offset, write.Size, write.Value));
        await Task.Delay(Quiet);
        Assert.Equal(runs, rig.Fake.Runs); // waiting, not in the guest
        rig.Exit.Reply(new DeviceProtocol.WriteDone(write.Id, MachineEnding: false));
        Assert.True(rig.Fake.WaitUntil(v => v.Runs == runs + 1 && v.InRun), "the vcpu did not run on after the write was done");
    }

    [Fact]
    public async Task Vcpu_must_run_no_more_guest_code_after_a_write_that_ends_the_machine()
    {
        var rig = Create();
        var runs = rig.Fake.Runs;
        // A string OUT: every element is waited for; the first one ends the machine.
        rig.Fake.Supply(new VmExit.Io(true, ExitPort, 1, 2, 1, [1, 2]), Out(UartBase, 'x'));

        var first = await rig.Exit.ExpectMsgAsync<DeviceProtocol.WriteAndWait>();
        var second = await rig.Exit.ExpectMsgAsync<DeviceProtocol.WriteAndWait>();
        Assert.Equal((1UL, 2UL, first.Id + 1), (first.Value, second.Value, second.Id));
        rig.Exit.Reply(new DeviceProtocol.WriteDone(first.Id, MachineEnding: true));
        rig.Exit.Reply(new DeviceProtocol.WriteDone(second.Id, MachineEnding: false));

        var registers = await rig.Vcpu.Ask<Registers>(GetRegisters.Instance, TimeSpan.FromSeconds(5));
        Assert.Equal(State.Ending, registers.State);
        rig.Vcpu.Tell(new VlapicProtocol.InterruptPending(0, 0x30)); // nothing wakes it into the guest
        await rig.Uart.ExpectNoMsgAsync(Quiet);
        Assert.Equal(runs, rig.Fake.Runs);
        Assert.Equal(1, rig.Fake.Pending); // the UART write was never executed

        rig.Vcpu.Tell(Stop.Instance, rig.Vm.Ref);
        Assert.Equal(StopReason.Requested, (await rig.Vm.ExpectMsgAsync<Stopped>()).Reason);
    }

    [Fact]
    public async Task Vcpu_must_post_mmio_writes_at_the_device_offset()
    {
        var rig = Create();

        rig.Fake.Supply(new VmExit.Mmio(MmioBase + 0x20, true, 4, 0xDEAD_BEEF));

        Assert.Equal(new DeviceProtocol.Write(0x20, 4, 0xDEAD_BEEF), await rig.Mmio.ExpectMsgAsync<DeviceProtocol.Write>());
        Assert.True(rig.Fake.WaitUntilIdleInGuest());
    }

    [Fact]
    public void Vcpu_must_run_on_its_pinned_thread_named_after_it()
    {
        var rig = Create(start: false, id: 3, pinned: true);

        rig.Vcpu.Tell(Start.Instance);
        rig.Fake.Supply(Out(UartBase, 1));

        Assert.True(rig.Fake.WaitUntil(v => v.Consumed == 1), "the pinned vcpu did not run");
        Assert.Equal("vcpu-3", rig.Fake.RunThreadName);
        Assert.Equal("vcpu-3", rig.Fake.BoundThreadName);

        // The bound thread is the kick target: every later run must be on it, also after a pause.
        rig.Vcpu.Tell(Pause.Instance);
        ExpectMsg(new Paused(3));
        rig.Vcpu.Tell(Resume.Instance);
        ExpectMsg(new Resumed(3));
        rig.Fake.Supply(Out(UartBase, 2), Out(UartBase, 3));
        Assert.True(rig.Fake.WaitUntil(v => v.Consumed == 3 && v.IdleInGuest), "the pinned vcpu did not run after resume");
        Assert.Equal(0, rig.Fake.RunsOffBoundThread);
        Assert.Equal("vcpu-3", rig.Fake.RunThreadName);
    }

    // ---- reads ----

    [Fact]
    public async Task Vcpu_must_wait_for_the_read_reply_with_its_correlation_id()
    {
        var rig = Create();

        rig.Fake.Supply(In(UartBase + 5));
        var read = await rig.Uart.ExpectMsgAsync<DeviceProtocol.Read>();
        Assert.Equal(5UL, read.Offset);
        Assert.Equal(1, read.Size);
        var runs = rig.Fake.Runs;

        // Not in the guest while the read is in flight: a scripted exit stays unconsumed.
        rig.Fake.Supply(Out(UartBase, 0x55));
        await rig.Uart.ExpectNoMsgAsync(Quiet);
        Assert.Equal(runs, rig.Fake.Runs);

        // A reply with another id is not this read's.
        rig.Vcpu.Tell(new DeviceProtocol.ReadResult(read.Id + 1, 0x11), rig.Uart.Ref);
        await rig.Uart.ExpectNoMsgAsync(Quiet);
        Assert.Empty(rig.Fake.IoInCompletions);
        Assert.Equal(runs, rig.Fake.Runs);

        rig.Vcpu.Tell(new DeviceProtocol.ReadResult(read.Id, 0x60), rig.Uart.Ref);
        Assert.Equal(new DeviceProtocol.Write(0, 1, 0x55), await rig.Uart.ExpectMsgAsync<DeviceProtocol.Write>());
        Assert.Equal([(0, 0x60UL)], rig.Fake.IoInCompletions);
        Assert.True(rig.Fake.WaitUntilIdleInGuest());
    }

    [Fact]
    public async Task Vcpu_must_complete_an_mmio_read_with_the_reply()
    {
        var rig = Create();

        rig.Fake.Supply(new VmExit.Mmio(MmioBase + 0x10, false, 4, 0));
        var read = await rig.Mmio.ExpectMsgAsync<DeviceProtocol.Read>();
        Assert.Equal(0x10UL, read.Offset);
        Assert.Equal(4, read.Size);
        var runs = rig.Fake.Runs;

        rig.Vcpu.Tell(new DeviceProtocol.ReadResult(read.Id - 1, 0xBAD), rig.Mmio.Ref);
        await rig.Mmio.ExpectNoMsgAsync(Quiet);
        Assert.Empty(rig.Fake.MmioReadCompletions);
        Assert.Equal(runs, rig.Fake.Runs);

        rig.Vcpu.Tell(new DeviceProtocol.ReadResult(read.Id, 0x1234_5678), rig.Mmio.Ref);
        Assert.True(rig.Fake.WaitUntil(v => v.Runs == runs + 1 && v.InRun), "the vcpu did not run after the reply");
        Assert.Equal([0x1234_5678UL], rig.Fake.MmioReadCompletions);
    }

    [Fact]
    public async Task Vcpu_must_read_every_element_of_a_rep_ins_in_sequence()
    {
        var rig = Create();
        ulong[] values = [0xA1, 0xB2, 0xC3];
        var ids = new HashSet<long>();

        rig.Fake.Supply(In(UartBase + 1, size: 1, count: 3));
        foreach (var value in values)
        {
            var read = await rig.Uart.ExpectMsgAsync<DeviceProtocol.Read>();
            Assert.Equal(new DeviceProtocol.Read(read.Id, 1, 1), read);
            Assert.True(ids.Add(read.Id), "each element must have its own correlation id");
            // One read at a time: the next element is asked for only after this reply.
            await rig.Uart.ExpectNoMsgAsync(TimeSpan.FromMilliseconds(50));
            rig.Vcpu.Tell(new DeviceProtocol.ReadResult(read.Id, value), rig.Uart.Ref);
        }

        Assert.True(rig.Fake.WaitUntilIdleInGuest());
        Assert.Equal([(0, 0xA1UL), (1, 0xB2UL), (2, 0xC3UL)], rig.Fake.IoInCompletions);
    }

    [Fact]
    public async Task Vcpu_must_move_a_device_range_on_its_mmio_bus_even_while_it_waits_for_a_reply()
    {
        var rig = Create();
        var bar = CreateTestProbe("bar");
        const ulong window = 0x1_0000_0000, at = 0xD000_0000;

        // Waiting for a read's reply (as a vcpu whose configuration write moved a BAR waits for it).
        rig.Fake.Supply(new VmExit.Mmio(MmioBase, false, 4, 0));
        var read = await rig.Mmio.ExpectMsgAsync<DeviceProtocol.Read>();
        rig.Vcpu.Tell(new MapMmio(7, "bar", bar.Ref, window, 0x8000, at), rig.Vm.Ref);
        Assert.Equal(new MmioMapped(7, 0, true), await rig.Vm.ExpectMsgAsync<MmioMapped>());
        rig.Vcpu.Tell(new DeviceProtocol.ReadResult(read.Id, 0), rig.Mmio.Ref);

        rig.Fake.Supply(new VmExit.Mmio(at + 0x3000, true, 2, 0));
        Assert.Equal(new DeviceProtocol.Write(window + 0x3000, 2, 0), await bar.ExpectMsgAsync<DeviceProtocol.Write>());

        // Moved: the old place decodes nothing (writes dropped), the new one reaches the device.
        rig.Vcpu.Tell(new MapMmio(8, "bar", bar.Ref, window, 0x8000, at + 0x10_0000), rig.Vm.Ref);
        Assert.Equal(new MmioMapped(8, 0, true), await rig.Vm.ExpectMsgAsync<MmioMapped>());
        rig.Fake.Supply(new VmExit.Mmio(at, true, 4, 1));
        rig.Fake.Supply(new VmExit.Mmio(at + 0x10_0004, true, 4, 2));
        Assert.Equal(new DeviceProtocol.Write(window + 4, 4, 2), await bar.ExpectMsgAsync<DeviceProtocol.Write>());

        // Over another device's range: not decoded; nowhere: gone.
        rig.Vcpu.Tell(new MapMmio(9, "bar", bar.Ref, window, 0x8000, MmioBase), rig.Vm.Ref);
        Assert.Equal(new MmioMapped(9, 0, false), await rig.Vm.ExpectMsgAsync<MmioMapped>());
        rig.Fake.Supply(new VmExit.Mmio(MmioBase + 8, true, 4, 3));
        Assert.Equal(new DeviceProtocol.Write(8, 4, 3), await rig.Mmio.ExpectMsgAsync<DeviceProtocol.Write>());
        rig.Vcpu.Tell(new MapMmio(10, "bar", bar.Ref, window, 0x8000, null), rig.Vm.Ref);
        Assert.Equal(new MmioMapped(10, 0, true), await rig.Vm.ExpectMsgAsync<MmioMapped>());
        rig.Fake.Supply(new VmExit.Mmio(at + 0x10_0004, true, 4, 4));
        await bar.ExpectNoMsgAsync(Quiet);
    }

    [Fact]
    public async Task Vcpu_must_stash_messages_while_a_read_is_in_flight()
    {
        var rig = Create();

        rig.Fake.Supply(In(UartBase + 5));
        var read = await rig.Uart.ExpectMsgAsync<DeviceProtocol.Read>();
        rig.Vcpu.Tell(Pause.Instance);
        await ExpectNoMsgAsync(Quiet);

        rig.Vcpu.Tell(new DeviceProtocol.ReadResult(read.Id, 0x60), rig.Uart.Ref);
        Assert.Equal(new Paused(0), await ExpectMsgAsync<Paused>());
        Assert.Equal([(0, 0x60UL)], rig.Fake.IoInCompletions);

        // The stashed Pause was handled before the guest ran again.
        var runs = rig.Fake.Runs;
        rig.Fake.Supply(Out(UartBase, 1));
        await rig.Uart.ExpectNoMsgAsync(Quiet);
        Assert.Equal(runs, rig.Fake.Runs);
    }

    [Fact]
    public async Task Vcpu_must_stop_while_a_read_is_in_flight()
    {
        var rig = Create();
        rig.Fake.Supply(In(UartBase + 5));
        var read = await rig.Uart.ExpectMsgAsync<DeviceProtocol.Read>();

        rig.Vcpu.Tell(Stop.Instance);

        Assert.Equal(StopReason.Requested, (await rig.Vm.ExpectMsgAsync<Stopped>()).Reason);
        Assert.Equal(StopReason.Requested, (await ExpectMsgAsync<Stopped>()).Reason);
        var runs = rig.Fake.Runs;
        // The late reply neither completes the IN nor restarts the vcpu.
        rig.Vcpu.Tell(new DeviceProtocol.ReadResult(read.Id, 0x60), rig.Uart.Ref);
        rig.Fake.Supply(Out(UartBase, 1));
        await rig.Uart.ExpectNoMsgAsync(Quiet);
        Assert.Empty(rig.Fake.IoInCompletions);
        Assert.Equal(runs, rig.Fake.Runs);
    }

    // ---- pause, resume, stop ----

    [Fact]
    public async Task Vcpu_must_be_kicked_by_a_message_that_comes_through_the_scheduler()
    {
        // Akka's scheduler wraps what it tells (ScheduledTellMsg): the mailbox must kick for the
        // message inside, or a vcpu sleeping in KVM_RUN would not see it until its next exit.
        var rig = Create();
        var kicks = rig.Fake.Kicks;

        Sys.Scheduler.ScheduleTellOnce(TimeSpan.FromMilliseconds(10), rig.Vcpu, Pause.Instance, TestActor);

        Assert.Equal(new Paused(0), await ExpectMsgAsync<Paused>());
        Assert.True(rig.Fake.Kicks > kicks, "the scheduled Pause must kick the vcpu out of the guest");
    }

    [Fact]
    public async Task Vcpu_must_pause_out_of_the_guest_and_resume()
    {
        var rig = Create();
        var kicks = rig.Fake.Kicks;

        rig.Vcpu.Tell(Pause.Instance);
        Assert.Equal(new Paused(0), await ExpectMsgAsync<Paused>());
        Assert.True(rig.Fake.Kicks > kicks, "Pause must kick the vcpu out of the guest");

        rig.Fake.Supply(Out(UartBase, 1), Out(UartBase, 2));
        await rig.Uart.ExpectNoMsgAsync(Quiet);
        Assert.Equal(0, rig.Fake.Consumed);
        Assert.Equal(2, rig.Fake.Pending);

        rig.Vcpu.Tell(Resume.Instance);
        Assert.Equal(new Resumed(0), await ExpectMsgAsync<Resumed>());
        Assert.Equal(new DeviceProtocol.Write(0, 1, 1), await rig.Uart.ExpectMsgAsync<DeviceProtocol.Write>());
        Assert.Equal(new DeviceProtocol.Write(0, 1, 2), await rig.Uart.ExpectMsgAsync<DeviceProtocol.Write>());
        Assert.True(rig.Fake.WaitUntilIdleInGuest());
    }

    [Fact]
    public async Task Vcpu_must_stop_on_request_and_tell_the_vm()
    {
        var rig = Create();

        rig.Vcpu.Tell(Stop.Instance);

        var stopped = await rig.Vm.ExpectMsgAsync<Stopped>();
        Assert.Equal(0, stopped.VcpuId);
        Assert.Equal(StopReason.Requested, stopped.Reason);
        Assert.Equal(StopReason.Requested, (await ExpectMsgAsync<Stopped>()).Reason);

        // Stopped for good: no more runs, and requests that need a live vcpu are refused.
        var runs = rig.Fake.Runs;
        rig.Fake.Supply(Out(UartBase, 1));
        rig.Vcpu.Tell(Resume.Instance);
        Assert.Equal(nameof(Resume), (await ExpectMsgAsync<Refused>()).Request);
        await rig.Uart.ExpectNoMsgAsync(Quiet);
        Assert.Equal(runs, rig.Fake.Runs);
    }

    [Fact]
    public async Task Vcpu_must_pause_before_start_and_resume_to_created()
    {
        var rig = Create(start: false);

        rig.Vcpu.Tell(Pause.Instance);
        Assert.Equal(new Paused(0), await ExpectMsgAsync<Paused>());
        rig.Vcpu.Tell(Resume.Instance);
        Assert.Equal(new Resumed(0), await ExpectMsgAsync<Resumed>());
        rig.Vcpu.Tell(GetStats.Instance);
        Assert.Equal(State.Created, (await ExpectMsgAsync<Stats>()).State);
        Assert.Equal(0, rig.Fake.Runs);
    }

    // ---- unassigned accesses ----

    [Fact]
    public async Task Vcpu_must_complete_unassigned_reads_with_all_ones_and_drop_unassigned_writes()
    {
        var rig = Create();

        rig.Fake.Supply(
            In(0x60, size: 1),
            In(0x70, size: 2),
            new VmExit.Mmio(0x1000_0000, false, 4, 0),
            new VmExit.Mmio(0x1000_0008, false, 8, 0),
            Out(0x80, 0x12),
            new VmExit.Mmio(0x1000_0000, true, 4, 0x1234));

        Assert.True(rig.Fake.WaitUntil(v => v.Consumed == 6 && v.IdleInGuest), "the vcpu waited on an unassigned access");
        Assert.Equal([(0, 0xFFUL), (0, 0xFFFFUL)], rig.Fake.IoInCompletions);
        Assert.Equal([0xFFFF_FFFFUL, ulong.MaxValue], rig.Fake.MmioReadCompletions);
        await rig.Uart.ExpectNoMsgAsync(Quiet);
        await rig.Mmio.ExpectNoMsgAsync(TimeSpan.Zero);

        rig.Vcpu.Tell(GetStats.Instance);
        var stats = await ExpectMsgAsync<Stats>();
        Assert.Equal(4, stats.UnassignedReads);
        Assert.Equal(2, stats.UnassignedWrites);
        Assert.Equal(3, stats.IoExits);
        Assert.Equal(3, stats.MmioExits);
        Assert.Equal(State.Running, stats.State);
    }

    // ---- HLT ----

    [Fact]
    public async Task Vcpu_must_report_hlt_with_interrupts_disabled_and_tell_the_vm_when_an_nmi_wakes_it()
    {
        var rig = Create();
        rig.Fake.InterruptsEnabled = false;

        rig.Fake.Supply(VmExit.Hlt.Instance);

        Assert.Equal(new VcpuHalted(0), await rig.Vm.ExpectMsgAsync<VcpuHalted>());

        rig.Vcpu.Tell(new ActorVmm.Lapic.VlapicProtocol.NmiPending(0));

        Assert.Equal(new VcpuWoken(0), await rig.Vm.ExpectMsgAsync<VcpuWoken>());
        Assert.True(rig.Fake.WaitUntil(f => f.NmisInjected == 1 && f.InRun));
        rig.Fake.Supply(VmExit.Hlt.Instance); // halts again: told again
        Assert.Equal(new VcpuHalted(0), await rig.Vm.ExpectMsgAsync<VcpuHalted>());
    }

    [Fact]
    public async Task Vcpu_must_stay_halted_until_notified()
    {
        var rig = Create();
        rig.Fake.InterruptsEnabled = true;

        rig.Fake.Supply(VmExit.Hlt.Instance, Out(UartBase, 7));

        Assert.True(rig.Fake.WaitUntil(f => f.Consumed == 1));
        await rig.Uart.ExpectNoMsgAsync(Quiet);
        await rig.Vm.ExpectNoMsgAsync(TimeSpan.Zero); // an idle guest's HLT (IF=1) is not the VM's business
        Assert.Equal(1, rig.Fake.Consumed);
        rig.Vcpu.Tell(GetStats.Instance);
        Assert.Equal(State.Halted, (await ExpectMsgAsync<Stats>()).State);

        rig.Vcpu.Tell(new VlapicProtocol.NmiPending(0));

        Assert.Equal(new DeviceProtocol.Write(0, 1, 7), await rig.Uart.ExpectMsgAsync<DeviceProtocol.Write>());
        Assert.True(rig.Fake.WaitUntilIdleInGuest());
    }

    [Fact]
    public async Task Vcpu_must_count_exits_per_reason_with_a_histogram_of_handling_time()
    {
        var rig = Create();
        rig.Fake.Supply(Out(UartBase, 1), Out(UartBase, 2), In(0x2F0));
        Assert.True(rig.Fake.WaitUntilIdleInGuest());

        rig.Vcpu.Tell(GetStats.Instance);
        var stats = await ExpectMsgAsync<Stats>();
        var outs = stats.Reasons.Single(r => r.Reason == "io-out");
        var ins = stats.Reasons.Single(r => r.Reason == "io-in");
        Assert.Equal(2, outs.Count);
        Assert.Equal(1, ins.Count);
        // Every exit the vcpu went back into the guest after is in the histogram once.
        Assert.Equal(2, outs.LatencyBuckets.Sum());
        Assert.Equal(1, ins.LatencyBuckets.Sum());
        Assert.Equal(12, outs.LatencyBuckets.Length);
        Assert.DoesNotContain(stats.Reasons, r => r.Reason == "mmio-read");
    }

    [Fact]
    public async Task Vcpu_must_not_sleep_through_a_notify_that_arrived_while_it_ran()
    {
        var rig = Create();
        rig.Fake.InterruptsEnabled = true;

        // The notify reaches the running vcpu (kick → Intr exit) before the guest's HLT exit.
        rig.Vcpu.Tell(new VlapicProtocol.InterruptPending(0, 0x30));
        Assert.True(rig.Fake.WaitUntilIdleInGuest());
        rig.Fake.Supply(VmExit.Hlt.Instance, Out(UartBase, 5));

        Assert.Equal(new DeviceProtocol.Write(0, 1, 5), await rig.Uart.ExpectMsgAsync<DeviceProtocol.Write>());
        await rig.Vm.ExpectNoMsgAsync(Quiet);
        rig.Vcpu.Tell(GetStats.Instance);
        Assert.Equal(State.Running, (await ExpectMsgAsync<Stats>()).State);
    }

    [Fact]
    public async Task Vcpu_must_resume_to_halted_unless_notified_while_paused()
    {
        var rig = Create();
        rig.Fake.Supply(VmExit.Hlt.Instance);
        Assert.True(rig.Fake.WaitUntil(f => f.Consumed == 1)); // halted (IF=1: the VM is not told)

        rig.Vcpu.Tell(Pause.Instance);
        await ExpectMsgAsync(new Paused(0));
        rig.Vcpu.Tell(Resume.Instance);
        await ExpectMsgAsync(new Resumed(0));
        rig.Vcpu.Tell(GetStats.Instance);
        Assert.Equal(State.Halted, (await ExpectMsgAsync<Stats>()).State);

        rig.Vcpu.Tell(Pause.Instance);
        await ExpectMsgAsync(new Paused(0));
        rig.Vcpu.Tell(new VlapicProtocol.InterruptPending(0, 0x30));
        rig.Fake.Supply(Out(UartBase, 9));
        await rig.Uart.ExpectNoMsgAsync(Quiet);
        rig.Vcpu.Tell(Resume.Instance);
        await ExpectMsgAsync(new Resumed(0));

        Assert.Equal(new DeviceProtocol.Write(0, 1, 9), await rig.Uart.ExpectMsgAsync<DeviceProtocol.Write>());
        Assert.True(rig.Fake.WaitUntilIdleInGuest());
    }

    // ---- interrupts ----

    [Fact]
    public void Vcpu_must_inject_an_interrupt_when_the_guest_is_ready()
    {
        var rig = Create();
        rig.Fake.ReadyForInterruptInjection = true;

        rig.Vcpu.Tell(new InjectInterrupt(0x20));

        Assert.True(rig.Fake.WaitUntil(v => v.Injected.Count == 1), "the vector was not injected");
        Assert.Equal([(byte)0x20], rig.Fake.Injected);
        Assert.False(rig.Fake.InterruptWindowRequested);
    }

    [Fact]
    public void Vcpu_must_request_an_interrupt_window_and_inject_once_ready()
    {
        var rig = Create();
        rig.Fake.ReadyForInterruptInjection = false;

        rig.Vcpu.Tell(new InjectInterrupt(0x21));

        Assert.True(rig.Fake.WaitUntil(v => v.InterruptWindowRequested && v.InRun), "no interrupt window was requested");
        Assert.Empty(rig.Fake.Injected);

        rig.Fake.ReadyForInterruptInjection = true;
        rig.Fake.Supply(VmExit.IrqWindowOpen.Instance);

        Assert.True(rig.Fake.WaitUntil(v => v.Injected.Count == 1 && v.InRun), "the vector was not injected once ready");
        Assert.Equal([(byte)0x21], rig.Fake.Injected);
        Assert.False(rig.Fake.InterruptWindowRequested);
    }

    [Fact]
    public async Task Vcpu_must_wake_from_hlt_to_inject_an_interrupt()
    {
        var rig = Create();
        rig.Fake.Supply(VmExit.Hlt.Instance);
        Assert.True(rig.Fake.WaitUntil(f => f.Consumed == 1)); // halted (IF=1: the VM is not told)

        rig.Vcpu.Tell(new InjectInterrupt(0x30));

        Assert.True(rig.Fake.WaitUntil(v => v.Injected.Count == 1 && v.InRun), "a halted vcpu was not woken by an interrupt");
        Assert.Equal([(byte)0x30], rig.Fake.Injected);
    }

    [Fact]
    public async Task Vcpu_must_not_halt_while_an_interrupt_waits_for_injection()
    {
        var rig = Create();
        rig.Fake.ReadyForInterruptInjection = false;
        rig.Vcpu.Tell(new InjectInterrupt(0x40));
        Assert.True(rig.Fake.WaitUntil(v => v.InterruptWindowRequested && v.InRun));

        rig.Fake.Supply(VmExit.Hlt.Instance);

        // The pending vector wakes the HLT at once: no halt, the vcpu re-enters.
        Assert.True(rig.Fake.WaitUntilIdleInGuest());
        await rig.Vm.ExpectNoMsgAsync(Quiet);
        rig.Fake.ReadyForInterruptInjection = true;
        rig.Fake.Supply(VmExit.IrqWindowOpen.Instance);
        Assert.True(rig.Fake.WaitUntil(v => v.Injected.Count == 1 && v.InRun));
        Assert.Equal([(byte)0x40], rig.Fake.Injected);
    }

    // ---- flow control ----

    [Fact]
    public async Task Vcpu_must_stop_running_when_the_write_window_is_full_until_credited()
    {
        var rig = Create();
        var extra = 3;

        for (var i = 0; i < DeviceProtocol.WriteWindow + extra; i++) rig.Fake.Supply(Out(UartBase, (ulong)(i & 0xFF)));

        for (var i = 0; i < DeviceProtocol.WriteWindow; i++) await rig.Uart.ExpectMsgAsync<DeviceProtocol.Write>();
        await rig.Uart.ExpectNoMsgAsync(Quiet);
        Assert.Equal(DeviceProtocol.WriteWindow, rig.Fake.Consumed);
        Assert.Equal(extra, rig.Fake.Pending);
        Assert.False(rig.Fake.InRun);

        rig.Vcpu.Tell(new DeviceProtocol.WriteCredit(DeviceProtocol.CreditBatch), rig.Uart.Ref);

        for (var i = 0; i < extra; i++) await rig.Uart.ExpectMsgAsync<DeviceProtocol.Write>();
        Assert.True(rig.Fake.WaitUntilIdleInGuest());
    }

    [Fact]
    public async Task Vcpu_must_ignore_credit_from_an_actor_that_is_not_its_device()
    {
        var rig = Create();
        var stranger = CreateTestProbe();

        for (var i = 0; i < DeviceProtocol.WriteWindow + 1; i++) rig.Fake.Supply(Out(UartBase, 0));
        for (var i = 0; i < DeviceProtocol.WriteWindow; i++) await rig.Uart.ExpectMsgAsync<DeviceProtocol.Write>();

        rig.Vcpu.Tell(new DeviceProtocol.WriteCredit(DeviceProtocol.CreditBatch), stranger.Ref);

        await rig.Uart.ExpectNoMsgAsync(Quiet);
        Assert.Equal(1, rig.Fake.Pending);
    }

    // ---- fatal exits ----

    [Fact]
    public async Task Vcpu_must_stop_with_a_report_on_an_internal_error()
    {
        var rig = Create();
        rig.Fake.Registers = new KvmRegs { Rip = 0x7C00, Rflags = 0x2 };

        rig.Fake.Supply(new VmExit.InternalError(VmExit.InternalError.EmulationFailure, [0x2, 0x0F, 0xC7]));

        var stopped = await rig.Vm.ExpectMsgAsync<Stopped>();
        Assert.Equal(0, stopped.VcpuId);
        Assert.Equal(StopReason.InternalError, stopped.Reason);
        Assert.Contains("vcpu 0", stopped.Report);
        Assert.Contains("emulation failure", stopped.Report);
        Assert.Contains("RIP", stopped.Report);
        Assert.Contains("7C00", stopped.Report);

        var runs = rig.Fake.Runs;
        rig.Fake.Supply(Out(UartBase, 1));
        await rig.Uart.ExpectNoMsgAsync(Quiet);
        Assert.Equal(runs, rig.Fake.Runs);
    }

    [Fact]
    public async Task Vcpu_must_stop_on_a_triple_fault()
    {
        var rig = Create();

        rig.Fake.Supply(VmExit.Shutdown.Instance);

        var stopped = await rig.Vm.ExpectMsgAsync<Stopped>();
        Assert.Equal(StopReason.TripleFault, stopped.Reason);
        Assert.Contains("triple fault", stopped.Report);
    }

    [Fact]
    public void Vcpu_must_fault_msr_accesses()
    {
        var rig = Create();

        rig.Fake.Supply(new VmExit.MsrRead(0xC000_0080, 0), new VmExit.MsrWrite(0x1B, 0xFEE0_0900, 0));

        Assert.True(rig.Fake.WaitUntil(v => v.Consumed == 2 && v.IdleInGuest));
        Assert.Equal([(0UL, true)], rig.Fake.MsrReadCompletions);
        Assert.Equal([true], rig.Fake.MsrWriteCompletions);
    }

    // ---- registers ----

    [Fact]
    public async Task Vcpu_must_answer_with_the_registers_of_its_vcpu()
    {
        var rig = Create();
        rig.Fake.Registers = new KvmRegs { Rax = 0x1111, Rsp = 0x8000, Rip = 0xFFF0, Rflags = 0x202 };

        rig.Vcpu.Tell(GetRegisters.Instance);

        var regs = await ExpectMsgAsync<Registers>();
        Assert.Equal(0, regs.VcpuId);
        Assert.Equal(State.Running, regs.State);
        Assert.Equal(0x1111UL, regs.General.Rax);
        Assert.Equal(0x8000UL, regs.General.Rsp);
        Assert.Equal(0xFFF0UL, regs.General.Rip);
        Assert.Equal(0x202UL, regs.General.Rflags);
    }

    [Fact]
    public async Task Vcpu_must_set_registers_and_acknowledge()
    {
        var rig = Create();
        var general = RegisterState.Reset with { Rip = 0x7C00, Rsp = 0x6000, Rdx = 0x80 };
        var special = SpecialRegisterState.From(default) with
        {
            Cs = SegmentState.RealMode(0x07C0, code: true),
            Cr0 = SpecialRegisterState.Cr0Et,
        };

        rig.Vcpu.Tell(new SetRegisters(general, special));

        Assert.Equal(new RegistersSet(0), await ExpectMsgAsync<RegistersSet>());
        Assert.Equal(general, RegisterState.From(rig.Fake.Registers));
        var sregs = rig.Fake.SpecialRegisters;
        Assert.Equal(0x07C0, sregs.Cs.Selector);
        Assert.Equal(0x7C00UL, sregs.Cs.Base);
        Assert.Equal(SpecialRegisterState.Cr0Et, sregs.Cr0);
        Assert.True(rig.Fake.WaitUntilIdleInGuest());
    }
}
