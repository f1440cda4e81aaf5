using System.Buffers.Binary;
using System.Text;
using ActorVmm.Devices;

namespace ActorVmm.Lapic;

/// <summary>
/// The text of a local APIC's state for `ctl regs`: mode, ID, TPR/PPR, SVR, the vectors set in
/// IRR, ISR and TMR, ESR, ICR, every LVT entry decoded, and the timer. Reads a
/// <see cref="LapicState"/> (a snapshot), so it shows what the guest would read at snapshot time.
/// </summary>
public static class LapicDump
{
    public static string Format(int vcpuId, LapicState state)
    {
        if (state.ApicPage.Length != LocalApic.PageSize)
            throw new ArgumentException($"an Apic Page is {LocalApic.PageSize} bytes, not {state.ApicPage.Length}", nameof(state));
        var page = state.ApicPage;
        uint R(int offset) => BinaryPrimitives.ReadUInt32LittleEndian(page.AsSpan()[offset..]);

        var mode = (state.ApicBase & LocalApic.BaseEnable) == 0 ? ApicMode.Disabled
            : (state.ApicBase & LocalApic.BaseExtd) != 0 ? ApicMode.X2Apic : ApicMode.XApic;
        var svr = R(ApicOffsets.Svr);
        var sb = new StringBuilder();
        sb.AppendLine($"local APIC of vcpu {vcpuId}: {mode}, id {state.ApicId}, " +
                      $"{((svr & (1u << 8)) != 0 ? "software-enabled" : "software-disabled")}, " +
                      $"APIC_BASE={state.ApicBase:X16}{((state.ApicBase & LocalApic.BaseBsp) != 0 ? " (BSP)" : "")}");
        sb.AppendLine($"  TPR={R(ApicOffsets.Tpr):X2} PPR={R(ApicOffsets.Ppr):X2} SVR={svr:X8} (spurious vector {svr & 0xFF:X2}) " +
                      $"LDR={R(ApicOffsets.Ldr):X8} DFR={R(ApicOffsets.Dfr):X8} ESR={R(ApicOffsets.Esr):X2}" +
                      (state.EsrPending != 0 ? $" (pending {state.EsrPending:X2})" : ""));
        sb.AppendLine($"  IRR: {Vectors(page.AsSpan(), ApicOffsets.Irr)}");
        sb.AppendLine($"  ISR: {Vectors(page.AsSpan(), ApicOffsets.Isr)}");
        sb.AppendLine($"  TMR: {Vectors(page.AsSpan(), ApicOffsets.Tmr)}");
        sb.AppendLine($"  ICR={R(ApicOffsets.IcrHigh):X8}:{R(ApicOffsets.IcrLow):X8}");
        foreach (var (name, offset) in new[]
                 {
                     ("timer", ApicOffsets.LvtTimer), ("LINT0", ApicOffsets.LvtLint0), ("LINT1", ApicOffsets.LvtLint1),
                     ("error", ApicOffsets.LvtError), ("perfmon", ApicOffsets.LvtPerfMon), ("thermal", ApicOffsets.LvtThermal),
                     ("CMCI", ApicOffsets.LvtCmci),
                 })
            sb.AppendLine($"  LVT {name,-8}{R(offset):X8} {Lvt(R(offset), offset == ApicOffsets.LvtTimer)}");
        var divide = R(ApicOffsets.TimerDivide);
        var timerMode = (TimerMode)((R(ApicOffsets.LvtTimer) >> 17) & 3);
        sb.Append($"  timer: initial count {R(ApicOffsets.TimerInitialCount)}, current count {R(ApicOffsets.TimerCurrentCount)}, " +
                  $"divide by {LocalApic.DivisorOf(divide)}, {(state.TimerArmed ? "counting" : "idle")}");
        if (timerMode == TimerMode.TscDeadline)
            sb.Append(state.TscDeadline == 0 ? ", TSC deadline disarmed" : $", TSC deadline {state.TscDeadline}");
        sb.AppendLine();
        sb.AppendLine($"  LINT0 {(state.Lint0Level ? "high" : "low")}, LINT1 {(state.Lint1Level ? "high" : "low")}");
        return sb.ToString();
    }

    /// <summary>The vectors whose bit is set in a 256-bit ISR/TMR/IRR bitmap, as hex, or "none".</summary>
    public static string Vectors(ReadOnlySpan<byte> page, int bitmapBase)
    {
        var set = new List<string>();
        for (var vector = 0; vector < 256; vector++)
        {
            var word = BinaryPrimitives.ReadUInt32LittleEndian(page[ApicOffsets.VectorRegister(bitmapBase, vector)..]);
            if ((word & (1u << (vector & 31))) != 0) set.Add(vector.ToString("X2"));
        }
        return set.Count == 0 ? "none" : string.Join(' ', set);
    }

    private static string Lvt(uint value, bool timer)
    {
        var parts = new List<string>();
        parts.Add((value & (1u << 16)) != 0 ? "masked" : "unmasked");
        if (timer) parts.Add(((TimerMode)((value >> 17) & 3)).ToString());
        else
        {
            parts.Add(((DeliveryMode)((value >> 8) & 7)).ToString());
            if ((value & (1u << 15)) != 0) parts.Add("level");
            if ((value & (1u << 14)) != 0) parts.Add("remote-IRR");
        }
        if ((value & (1u << 12)) != 0) parts.Add("send-pending");
        parts.Add($"vector {value & 0xFF:X2}");
        return string.Join(", ", parts);
    }
}
